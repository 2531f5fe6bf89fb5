"""lowprec: train networks with 4-bit (LUQ) and N:M-sparse (MVUE) neural gradients."""

from .baselines import FP4RDN, IntSR, Radix4, fp4_rdn, int_sr, radix4
from .intq import IntQuant, int_quant, mse_clip, sawb_clip
from .luq import LUQ, luq, luq_levels, luq_variance
from .nm import NMPrune, nm_noise_shape, nm_prune, nm_variance
from .recipes import (FWD_NAMES, GRAD_NAMES, Chain, FwdRecipe, GradRecipe, estimator, fwd_recipe, grad_recipe,
                      sample_mean)
from .stats import compare, estimator_stats

__version__ = "0.1.0"
from . import dispatch  # kernels helper: lowprec.dispatch.{luq,nm_prune,int_quant,luq_pack,luq_unpack}
from .layers import ConvertReport, QConv2d, QLinear, collect_stats, convert, set_recipes, unconvert  # layers helper
