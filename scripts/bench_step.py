"""CPU estimator overhead (issue 9): step-time ratio of every grad recipe against fp32, and per-call
time of each estimator against public implementations' algorithms.

Step ratios: for each workload (ResNet-20 on digits 16x16, batch 128; the char-level GPT on
shakespeare_char, batch 16 x 64 tokens) a plain, unconverted fp32 model and the same model converted
to the recipe (same initial weights, same fixed batch) take forward + backward + optimizer steps in
one process, one thread, alternating (ABBA order, so drift hits both alike); the ratio is the median
over step pairs of recipe step / fp32 step (the two steps of a pair are adjacent in time, so the
machine's slow drift cancels), with a distribution-free 95% interval for that median (order
statistics of the pair ratios: [r_(k), r_(n+1-k)] with k the largest for which
P(Binomial(n, 1/2) < k) <= 2.5%; n = 20 pairs: [r_(6), r_(15)], 95.9% coverage; the char GPT's
steps are short, so it takes n = 40: [r_(14), r_(27)], 96.2%). A recipe meets
its target when the interval's upper end is within it, misses it when the lower end is above it, and
is undecided when the interval holds the target. Both models step under the allocator setting the trainer
uses (:mod:`lowprec.allocator`: glibc keeps freed memory instead of faulting it in again every step;
``LOWPREC_MALLOC=default`` measures under glibc's defaults). The estimators' CPU path is the automatic one (the CPU twins,
:mod:`lowprec.kernels.cpu`, as C: :mod:`lowprec.kernels.native`); ``--modes`` adds the twins' torch
cores (``LOWPREC_CPU_NATIVE=0``: what runs without a C compiler) and the readable references
(``LOWPREC_BACKEND=reference``, what issue 9 measured) for the main recipes. The first native step's
extra time (the one-off C build, ~1 s, or loading the cached library) is the warm-up column.

Per call: each estimator on [4096, 1024] and [256, 12544] log-normal tensors (random signs), median of
``--calls``: the reference, the CPU twin (C; its torch core with ``--modes torch``) and a plain-PyTorch
rendering of the published algorithm of the public implementation (written here from the papers'
descriptions, credited at each function; no code copied).

    python scripts/bench_step.py --quick     # < 1 min: every path runs once on tiny inputs (CI)
    python scripts/bench_step.py --modes native,torch,reference --out results/bench_step_cpu.md
    python scripts/bench_step.py --device cuda --workloads resnet50,chargpt_gpu \
        --recipes luq4,mvue24,mvue24_luq4,fwd:int4 --no-estimators   # the GPU check (scripts/gpu_check.sh)

On CUDA the steps run under bf16 autocast and are timed between synchronizations; ``fwd:int4`` is the
forward INT4 recipe (weights and activations), the others are grad recipes.

Writes the machine, thread count, date, load average and the busiest other processes with the tables:
times on a shared machine are only as good as its quiet.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowprec import allocator
from lowprec.convert import convert
from lowprec.data import DataSpec, build_datasets
from lowprec.kernels import cpu as cpu_twins
from lowprec.kernels import native
from lowprec.luq import luq as luq_reference
from lowprec.models import ModelSpec, build_model
from lowprec.provenance import cpu_model
from lowprec.nm import nm_noise_shape
from lowprec.nm import nm_prune as nm_reference
from lowprec.recipes import GRAD_NAMES

MAIN_RECIPES = ("luq4", "mvue12", "mvue24", "mvue24_approx", "mvue24_luq4")
TARGET = 1.3  # issue 18: every named grad recipe within 1.3x an fp32 step on both CPU workloads
TARGETS = {r: TARGET for r in GRAD_NAMES if r != "fp32"}
PAIRS = {"chargpt": 40}  # timed step pairs per recipe (default 20): the char GPT's ~17 ms steps afford more
SHAPES = ((4096, 1024), (256, 12544))


# ----------------------------------------------------------------------------- public algorithms
# Written from the published descriptions, not from the repositories' code.


def public_luq(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """LUQ as described by Chmiel et al., "Accurate Neural Training with 4-bit Matrix Multiplications
    at Standard Formats" (ICLR 2023, code linked from openreview id yTbNYYcopd): threshold
    α = max|x|/2^(2^(b-1)-1) (their level count), stochastic underflow below α, then the exponent
    from log2 and stochastic rounding between 2^floor(log2) and twice that (pow/log2 formulation)."""
    a = x.abs()
    alpha = a.max() / 2 ** (2 ** (bits - 1) - 1)
    under = torch.where(torch.rand_like(a) * alpha < a, alpha, torch.zeros_like(a))
    lo = alpha * torch.pow(2.0, torch.floor(torch.log2(torch.clamp(a, min=alpha) / alpha)))
    level = torch.where(torch.rand_like(a) < (a - lo) / lo, 2 * lo, lo)
    return torch.sign(x) * torch.where(a < alpha, under, torch.minimum(level, a.max()))


def public_mvue24(x: torch.Tensor) -> torch.Tensor:
    """MVUE 2:4 as described by Chmiel et al., "Minimum Variance Unbiased N:M Sparsity for the Neural
    Gradients" (ICLR 2023): per block of 4 sort |x|; if the largest exceeds S/2 keep it and pick one
    of the other three with probability ∝ |x| (kept as sign·(S - max)), else pick two with
    probabilities 2|x|/S by systematic sampling over the sorted entries, kept as sign·S/2."""
    b = x.reshape(-1, 4)
    a = b.abs()
    srt, idx = torch.sort(a, dim=1, descending=True)
    S = srt.sum(1, keepdim=True)
    dominant = srt[:, :1] > S / 2
    rest = S - srt[:, :1]
    p = torch.where(dominant, torch.cat([torch.ones_like(rest), srt[:, 1:] / rest.clamp_min(1e-30)], 1),
                    2 * srt / S.clamp_min(1e-30))
    c = torch.cumsum(torch.where(dominant, torch.cat([torch.zeros_like(rest), p[:, 1:]], 1), p), 1)
    u = torch.rand_like(S)
    pts = torch.cat([u, u + 1], 1)
    hit = torch.zeros_like(a, dtype=torch.bool)
    lo = torch.cat([torch.zeros_like(S), c[:, :-1]], 1)
    for k in range(2):
        hit |= (pts[:, k:k + 1] >= lo) & (pts[:, k:k + 1] < c)
    hit = torch.where(dominant, hit | (torch.arange(4) == 0), hit)
    val = torch.where(dominant, torch.where(torch.arange(4) == 0, srt, rest), S / 2)
    out = torch.zeros_like(a).scatter_(1, idx, torch.where(hit, val, torch.zeros_like(val)))
    return (torch.sign(b) * out).reshape(x.shape)


def public_mvue12(x: torch.Tensor) -> torch.Tensor:
    """MVUE 1:2 (same paper): keep sign(x_i)·(|a| + |b|) for one of the pair, chosen with probability ∝ |x|."""
    b = x.reshape(-1, 2)
    a = b.abs()
    S = a.sum(1, keepdim=True)
    first = torch.rand_like(S) * S < a[:, :1]
    keep = torch.cat([first, ~first], 1) & (a > 0)
    return torch.where(keep, torch.sign(b) * S, torch.zeros_like(b)).reshape(x.shape)


def public_mvue24_approx(x: torch.Tensor) -> torch.Tensor:
    """Approximate MVUE 2:4 as described for the MVUE24_approx Triton kernel of Hu et al., "Accelerating
    Transformer Pre-training with 2:4 Sparsity" (ICML 2024): cumulative sums of |x| computed once, a
    first index drawn by u1·S against them, a second by u2·(S - |x_first|) against the same cumulative
    sums with the first entry's mass removed, kept entries rescaled by their inclusion probability."""
    b = x.reshape(-1, 4)
    a = b.abs()
    S = a.sum(1, keepdim=True)
    c = torch.cumsum(a, 1)
    u = torch.rand(b.shape[0], 2)
    i1 = (c <= u[:, :1] * S).sum(1, keepdim=True).clamp_max(3)
    a1 = a.gather(1, i1)
    c2 = c - torch.where(torch.arange(4) >= i1, a1, torch.zeros_like(a1))
    t2 = u[:, 1:] * (S - a1)
    i2 = ((c2 <= t2) | (torch.arange(4) == i1)).sum(1, keepdim=True).clamp_max(3)
    t = a / S
    inv = t / (1 - t).clamp_min(1e-30)
    p = t + t * (inv.sum(1, keepdim=True) - inv)
    keep = torch.zeros_like(a, dtype=torch.bool).scatter_(1, i1, True).scatter_(1, i2, True)
    return torch.where(keep & (a > 0), b / p.clamp_min(1e-30), torch.zeros_like(b)).reshape(x.shape)


# ----------------------------------------------------------------------------- machine and timing


def machine() -> list[str]:
    cpu = cpu_model()
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    try:
        ps = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True,
                            timeout=10).stdout.splitlines()[1:7]
        busy = ", ".join(" ".join(p.split()[::-1]) + "%" for p in ps if p.strip())
    except (OSError, subprocess.SubprocessError):
        busy = "unknown"
    return [f"- machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; "
            f"{torch.get_num_threads()} torch thread(s)",
            f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; load average "
            f"{' / '.join(f'{v:.2f}' if isinstance(v, float) else v for v in load)} (1/5/15 min)",
            f"- busiest processes when started: {busy}"]


def ratio_ci(tb: list[float], tr: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(median, lower, upper) of the pair ratios tr[i] / tb[i]: the distribution-free interval for
    the median (module docstring); lower = upper = nan when n is too small for `level`."""
    from scipy.stats import binom

    r = sorted(b / a for a, b in zip(tb, tr))
    n, k = len(r), 0
    while k + 1 <= n // 2 and binom.cdf(k, n, 0.5) <= (1 - level) / 2:
        k += 1  # P(Binomial(n, 1/2) <= k - 1) <= alpha/2: r_(k) is a lower limit (1-indexed)
    if k == 0:
        return statistics.median(r), float("nan"), float("nan")
    return statistics.median(r), r[k - 1], r[n - k]


def verdict(lo: float, ratio: float, hi: float, target: float) -> str:
    """'met' (the interval's upper end within the target), 'MISSED' (its lower end above), else
    'undecided'; by the point estimate alone when there is no interval (--quick)."""
    if math.isnan(hi):  # too few pairs
        return "met" if ratio <= target else "MISSED"
    return "met" if hi <= target else "MISSED" if lo > target else "undecided"


def median_time(fn, calls: int) -> float:
    fn()  # warm-up: first-call costs (allocator, lazy imports) are not what is measured
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


class Mode:
    """Estimator CPU path for a block of measurements: 'native' (the C twins, the default), 'torch' (the
    twins' torch cores, what runs without a C compiler), 'reference' (the readable references)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.env = os.environ.get("LOWPREC_BACKEND")
        if self.name == "reference":
            os.environ["LOWPREC_BACKEND"] = "reference"
        if self.name == "auto":  # CUDA: whatever the dispatcher picks (the Triton kernels)
            return self
        native.set_enabled(self.name == "native")
        return self

    def __exit__(self, *exc):
        if self.name == "auto":
            return
        if self.env is None:
            os.environ.pop("LOWPREC_BACKEND", None)
        else:
            os.environ["LOWPREC_BACKEND"] = self.env
        native.set_enabled(None)


# ----------------------------------------------------------------------------- step ratios


def workload(name: str, quick: bool, device: str = "cpu"):
    """(model factory, batch (x, y), optimizer factory, description)."""
    if name == "resnet50":  # synthetic ImageNet-sized batch: the step time does not depend on the pixels
        import torchvision

        bs, res = (2, 64) if quick else (128, 224)
        g = torch.Generator().manual_seed(0)
        batch = torch.randn(bs, 3, res, res, generator=g), torch.randint(1000, (bs,), generator=g)

        def make(recipe: str):
            torch.manual_seed(0)
            model = torchvision.models.resnet50(num_classes=1000)
            return _convert(model, recipe).to(device)

        opt = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4)  # noqa: E731
        return make, tuple(t.to(device) for t in batch), opt, f"resnet50, synthetic {res}x{res} batch {bs}, SGD"
    if name == "chargpt_gpu":  # a GPU-sized width of the same decoder, random tokens
        kw = ({"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0} if quick else
              {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "dropout": 0.0})
        spec = ModelSpec("chargpt", "lm", kw)
        bs, T = (2, 16) if quick else (64, 256)
        g = torch.Generator().manual_seed(0)
        batch = torch.randint(84, (bs, T), generator=g), torch.randint(84, (bs, T), generator=g)

        def make(recipe: str):
            torch.manual_seed(0)
            return _convert(build_model(spec, num_classes=84, in_channels=1, image_size=T), recipe).to(device)

        opt = lambda p: torch.optim.AdamW(p, lr=3e-4, weight_decay=0.1)  # noqa: E731
        return (make, tuple(t.to(device) for t in batch), opt,
                f"chargpt ({kw['n_layer']} layers, {kw['n_embd']} wide), random tokens, batch {bs} x {T}, AdamW")
    if name == "resnet20":
        spec = ModelSpec("resnet20", "cifar", {"width": 1, "shortcut": "A"})
        ds = build_datasets(DataSpec("digits", image_size=16))
        bs = 8 if quick else 128
        items = [ds.train[i] for i in range(bs)]
        batch = torch.stack([torch.as_tensor(a) for a, _ in items]), torch.tensor([int(b) for _, b in items])
        dims = dict(num_classes=ds.num_classes, in_channels=ds.in_channels, image_size=ds.image_size)
        opt = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4)  # noqa: E731
        desc = f"resnet20 on digits 16x16, batch {bs}, SGD momentum"
    else:
        spec = ModelSpec("chargpt", "lm", {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64,
                                            "dropout": 0.0})
        bs, T = (2, 16) if quick else (16, 64)
        g = torch.Generator().manual_seed(0)
        try:
            from lowprec.text_data import TextDataSpec

            ds = build_datasets(TextDataSpec("shakespeare_char", block_size=64, download=False))
            idx = torch.randint(len(ds.train), (bs,), generator=g).tolist()
            x, y = (torch.stack([ds.train[i][k][:T] for i in idx]) for k in (0, 1))
            vocab, src = ds.num_classes, "shakespeare_char"
        except Exception as e:  # noqa: BLE001 - no cached corpus: the step time does not depend on the text
            vocab, src = 84, f"random tokens ({type(e).__name__}: shakespeare_char not cached)"
            x = torch.randint(vocab, (bs, T), generator=g)
            y = torch.randint(vocab, (bs, T), generator=g)
        batch = (x, y)
        dims = dict(num_classes=vocab, in_channels=1, image_size=64)
        opt = lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1)  # noqa: E731
        desc = f"chargpt (2 layers, 64 wide) on {src}, batch {bs} x {T} tokens, AdamW"

    def make(recipe: str):
        torch.manual_seed(0)
        return _convert(build_model(spec, **dims), recipe).to(device)

    return make, tuple(t.to(device) for t in batch), opt, desc


def _convert(model, recipe: str):
    """``plain``: untouched; ``fwd:NAME``: a forward recipe; else a grad recipe."""
    if recipe.startswith("fwd:"):
        convert(model, fwd=recipe[4:], grad="fp32")
    elif recipe != "plain":
        convert(model, fwd="fp32", grad=recipe)
    return model


def step_fn(model, batch, opt_factory):
    opt = opt_factory(model.parameters())
    x, y = batch
    cuda = x.is_cuda

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    return step


def ratio_rows(wl: str, recipes, modes, steps: int, warmup: int, quick: bool, device: str = "cpu") -> list[str]:
    make, batch, opt, desc = workload(wl, quick, device)
    base = step_fn(make("plain"), batch, opt)
    for _ in range(max(warmup, 1)):
        base()
    rows = [f"### {desc}; {steps} step pairs per recipe", "",
            "| recipe | CPU path | fp32 step | recipe step | ratio | 95% CI | target | warm-up |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    verdicts: list[str] = []
    base_medians: list[float] = []  # the fp32 step's median per row: how steady the machine was
    for mode in modes if device == "cpu" else ["auto"]:
        for r in recipes if mode in ("native", "auto") else [r for r in recipes if r in MAIN_RECIPES]:
            with Mode(mode):
                try:
                    t0 = time.perf_counter()
                    step = step_fn(make(r), batch, opt)
                    step()
                    first = time.perf_counter() - t0
                    for _ in range(max(warmup - 1, 0)):
                        step()
                    tb, tr = [], []
                    for i in range(steps):  # ABBA: each pair alternates which one goes first
                        order = ((base, tb), (step, tr)) if i % 2 == 0 else ((step, tr), (base, tb))
                        for fn, acc in order:
                            t = time.perf_counter()
                            fn()
                            acc.append(time.perf_counter() - t)
                    mb, mr = statistics.median(tb), statistics.median(tr)
                    base_medians.append(mb)
                    ratio, lo, hi = ratio_ci(tb, tr)
                    ci = "—" if math.isnan(hi) else f"[{lo:.2f}, {hi:.2f}]"
                    warm = f"{first - mr:.2f} s" if mode == "native" else ""
                    rows.append(f"| {r} | {mode} | {mb * 1e3:.1f} ms | {mr * 1e3:.1f} ms | {ratio:.2f}x | {ci} | "
                                f"{TARGETS.get(r, '')}{'x' if r in TARGETS else ''} | {warm} |")
                    if r in TARGETS and mode in ("native", "auto"):
                        v = verdict(lo, ratio, hi, TARGETS[r])
                        verdicts.append(f"{r} {ratio:.3f}x {ci} {v}")
                except Exception as e:  # noqa: BLE001 - one failing recipe must not hide the others
                    rows.append(f"| {r} | {mode} | | | error: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | |")
            print(rows[-1], flush=True)
    if verdicts:
        missed = [v.split()[0] for v in verdicts if v.endswith("MISSED")]
        open_ = [v.split()[0] for v in verdicts if v.endswith("undecided")]
        checked = {v.split()[0] for v in verdicts}
        unmeasured = [r for r in recipes if r in TARGETS and r not in checked]
        met = len(checked) - len(missed) - len(open_)
        rows += ["", "Targets on the automatic CPU path (ratio, 95% CI, verdict): " + "; ".join(verdicts) + ".",
                 f"Verdict: {met} of {len(checked)} recipes within {TARGET}x"
                 + (f"; MISSED: {', '.join(missed)}" if missed else "")
                 + (f"; undecided (the interval holds {TARGET}x): {', '.join(open_)}" if open_ else "")
                 + (f"; not measured (error): {', '.join(unmeasured)}" if unmeasured else "") + "."]
    if len(base_medians) > 1:  # the same fp32 step every row: its spread is the machine's, not the code's
        rows += ["", f"The fp32 step's median across the {len(base_medians)} rows: {min(base_medians) * 1e3:.1f}-"
                     f"{max(base_medians) * 1e3:.1f} ms (the same step each time: a steady machine keeps these "
                     "within a few per cent)."]
    return rows + [""]


# ----------------------------------------------------------------------------- per call


def lognormal(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.exp(2.0 * torch.randn(shape, generator=g)) * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)


def estimator_rows(shapes, modes, calls: int) -> list[str]:
    ours = {
        "luq4": (lambda x: luq_reference(x), lambda x: cpu_twins.luq(x), public_luq),
        "mvue12": (lambda x: nm_reference(x, 1, 2), lambda x: cpu_twins.nm_prune(x, 1, 2), public_mvue12),
        "mvue24": (lambda x: nm_reference(x, 2, 4), lambda x: cpu_twins.nm_prune(x, 2, 4), public_mvue24),
        "mvue24_approx": (lambda x: nm_reference(x, 2, 4, method="mvue_approx"),
                          lambda x: cpu_twins.nm_prune(x, 2, 4, method="mvue_approx"), public_mvue24_approx),
    }
    rows = ["| estimator | shape | reference | CPU twin (C) | CPU twin (torch core) | public algorithm | "
            "best lowprec vs public |", "|---|---|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        x = lognormal(shape)
        for name, (ref, twin, public) in ours.items():
            t_ref = median_time(lambda: ref(x), calls)
            t_twin = median_time(lambda: twin(x), calls)
            t_comp = None
            if "torch" in modes:
                with Mode("torch"):
                    t_comp = median_time(lambda: twin(x), calls)
            t_pub = median_time(lambda: public(x), calls)
            best = min(t for t in (t_ref, t_twin, t_comp) if t is not None)
            comp = f"{t_comp * 1e3:.1f} ms" if t_comp is not None else "not run"
            rows.append(f"| {name} | {list(shape)} | {t_ref * 1e3:.1f} ms | {t_twin * 1e3:.1f} ms | {comp} | "
                        f"{t_pub * 1e3:.1f} ms | {t_pub / best:.2f}x |")
            print(rows[-1], flush=True)
    return rows + [""]


def check_twins(shape) -> list[str]:
    """The twins must equal the references bit for bit (given the same uniforms): checked once here too."""
    x = lognormal(shape, seed=1)
    u = torch.rand(shape)
    bad = [] if torch.equal(cpu_twins.luq(x, noise=u), luq_reference(x, noise=u)) else ["luq4"]
    for n, m, method in ((1, 2, "mvue"), (2, 4, "mvue"), (2, 4, "mvue_approx")):
        un = torch.rand(nm_noise_shape(x.shape, n, m, method))
        if not torch.equal(cpu_twins.nm_prune(x, n, m, method=method, noise=un),
                           nm_reference(x, n, m, method=method, noise=un)):
            bad.append(f"{method}{n}{m}")
    from lowprec import baselines, hadamard
    if not (torch.equal(cpu_twins.radix4(x), baselines.radix4(x)) and torch.equal(cpu_twins.fp4_rdn(x), baselines.fp4_rdn(x))):
        bad.append("radix4/fp4_rdn")
    if not torch.equal(cpu_twins.int_sr(x, noise=u), baselines.int_sr(x, noise=u)):
        bad.append("int4_sr")
    s = hadamard.random_signs(16, generator=torch.Generator().manual_seed(0))
    if not all(torch.equal(cpu_twins.block_rht(x, s, d), hadamard.block_rht(x, s, d)) for d in (0, -1)):
        bad.append("block_rht")
    return [f"- CPU twins vs references on {list(shape)} with the same uniforms: "
            + ("bit-identical" if not bad else f"DIFFER for {bad}")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny inputs, one step per recipe: checks every path runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workloads", default="resnet20,chargpt")
    p.add_argument("--recipes", default=",".join(r for r in GRAD_NAMES if r != "fp32"))
    p.add_argument("--modes", default="native", help="comma list of native, torch, reference")
    p.add_argument("--steps", type=int, default=None,
                   help="timed step pairs per recipe (default 20, the char GPT 40; quick 1)")
    p.add_argument("--calls", type=int, default=None, help="calls per estimator timing (default 15; quick 1)")
    p.add_argument("--out", type=Path, default=None, help="markdown output (default results/bench_step_cpu.md; "
                                                          "quick: none)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-estimators", action="store_true", help="skip the per-call estimator table")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    alloc = allocator.keep_freed_memory()  # as the trainer does; LOWPREC_MALLOC=default: glibc's own
    modes = args.modes.split(",")
    if set(modes) - {"native", "torch", "reference"}:
        p.error(f"--modes: unknown {sorted(set(modes) - {'native', 'torch', 'reference'})}")
    calls = args.calls or (1 if args.quick else 15)
    shapes = ((64, 256), (16, 784)) if args.quick else SHAPES
    out = args.out if args.out is not None else (None if args.quick else Path(f"results/bench_step_{args.device}.md"))

    cmd = "python scripts/bench_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    gpu = [f"- device: {torch.cuda.get_device_name()} (bf16 autocast; estimators on the Triton kernels)"] \
        if args.device == "cuda" else [f"- CPU path: {native.status()} unless the row says otherwise"]
    how = ("glibc keeping freed memory (lowprec.allocator, as the trainer sets it)" if alloc["malloc"] == "keep"
           else f"the default ({alloc['why']})")
    mem = [f"- allocator: {how}; fp32 and recipe steps alike"]
    head = [f"# {'GPU' if args.device == 'cuda' else 'CPU'} estimator overhead (issue 9)", "",
            f"Command: `{cmd.strip()}`", "", *machine(), *gpu, *mem, ""]
    print("\n".join(head), flush=True)
    t0 = time.time()
    body = ["## Step time, recipe over plain fp32 (median ratio of alternating step pairs, 95% CI)", ""]
    for wl in args.workloads.split(","):
        steps = args.steps or (1 if args.quick else PAIRS.get(wl, 20))
        body += ratio_rows(wl, args.recipes.split(","), modes, steps, warmup=0 if args.quick else 3,
                           quick=args.quick, device=args.device)
    if not args.no_estimators:
        body += ["## Per call, one thread (median)", ""] + estimator_rows(shapes, modes, calls)
        body += check_twins(shapes[0])
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    tail = ["", f"Wall time {time.time() - t0:.0f} s" + (f"; load average at the end {load[0]:.2f}" if load else ""),
            ""]
    text = "\n".join(head + body + tail)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print("\n".join(tail))
    return 1 if any("error:" in r or "DIFFER" in r for r in body) else 0


if __name__ == "__main__":
    sys.exit(main())
