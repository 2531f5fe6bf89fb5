"""lowprec: train networks with 4-bit (LUQ) and N:M-sparse (MVUE) neural gradients."""

from . import dispatch
from .baselines import fp4_rdn, int_sr, radix4
from .estimators import (LUQ, SMP, Chain, Estimator, FP4RDN, IntQuant, IntSR, NMPrune, Radix4,
                         sample_mean)
from .estimators import MXFP4, NVFP4, BlockLUQ
from .fp4 import block_luq_variance, e2m1_round, e4m3_round, fp4_sr_variance, scale_clip_stats
from .hadamard import block_rht, hadamard_matrix, random_signs
from .intq import mse_clip, sawb_clip
from .luq import luq_levels, luq_variance
from .nm import nm_noise_shape, nm_variance
from .recipes import FWD_NAMES, GRAD_NAMES, FwdRecipe, GradRecipe, estimator, fwd_recipe, grad_recipe
from ._common import NonFiniteError
from .stats import compare, estimator_stats

# The public functions go through the dispatcher: Triton kernels for CUDA tensors, the plain-PyTorch
# references (lowprec.luq.luq, lowprec.nm.nm_prune, lowprec.intq.int_quant) otherwise; backend= forces one.
from .dispatch import int_quant, luq, luq_pack, luq_unpack, nm_luq, nm_prune  # noqa: E402
from .dispatch import block_luq, mxfp4, nvfp4  # noqa: E402
from .convert import ConvertReport, collect_stats, convert, set_recipes, unconvert  # noqa: E402
from .layers import QConv1d, QConv2d, QLinear  # noqa: E402
from .layers_hf import QConv1D  # noqa: E402
from .layers_mha import QMultiheadAttention  # noqa: E402

__version__ = "0.1.0"
