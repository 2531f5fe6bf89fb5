"""Benchmark the estimators: reference eager vs reference under torch.compile vs the Triton kernel
(and, on a CPU, the CPU twin the dispatcher runs there: kernels/cpu.py).

Not a test. For each estimator (luq4, mvue12, mvue24, mvue24_approx, mse24, int4 fwd, the fused
mvue24_luq4 composite, and the block FP4 formats nvfp4_rtn/sr, mxfp4_rtn/sr, luq4_b16) and size,
times each implementation (GPU: CUDA events; CPU: perf_counter; warmup, then the median of
--repeat) and prints a markdown table: time, effective GB/s, speed-up over the eager reference,
and on a GPU the fraction of the device-to-device copy bandwidth (``x.clone()`` measured in the
same run, the ceiling for a one-read-one-write op). Then one training-step figure: ResNet-18 (CPU)
or ResNet-50 (GPU) fwd+bwd+SGD step with grad=luq4, grad=mvue24 and fwd=int4 over fp32.

GB/s counts nominal bytes: the input read once + the output written once (what a fused
single-pass kernel moves), for every implementation alike. The two-pass LUQ kernel really moves
1.5x that (max pass + quantize pass); the references move far more (temporaries).

    python scripts/bench_kernels.py --quick            # CPU: a few minutes
    python scripts/bench_kernels.py                    # GPU: 64K..256M elements
    python scripts/bench_kernels.py --interpret        # CPU: also time the kernels in Triton's interpreter
    python scripts/bench_kernels.py --out results/bench_kernels_cpu.md
"""

from __future__ import annotations

import argparse
import os
import sys

# Triton reads TRITON_INTERPRET when it is first imported (torch.compile imports it): decide first.
if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import datetime  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from lowprec import fp4  # noqa: E402
from lowprec.dispatch import resolve  # noqa: E402
from lowprec.intq import int_quant  # noqa: E402
from lowprec.kernels import cpu as cpu_twins  # noqa: E402
from lowprec.kernels import native  # noqa: E402
from lowprec.kernels import interpreter_enabled, triton_available  # noqa: E402
from lowprec.luq import luq  # noqa: E402
from lowprec.nm import nm_prune  # noqa: E402

ROWS = 256  # N:M inputs are [C_out=256, tokens] matrices, blocks along tokens (dim -1)

# name -> (reference fn, kernel fn factory, memory factor of the reference in units of the input)
ESTIMATORS = {
    "luq4": (lambda x: luq(x, 4), lambda k: (lambda x: k.luq.luq(x, 4)), 12),
    "mvue12": (lambda x: nm_prune(x, 1, 2), lambda k: (lambda x: k.nm.nm_prune(x, 1, 2)), 30),
    "mvue24": (lambda x: nm_prune(x, 2, 4), lambda k: (lambda x: k.nm.nm_prune(x, 2, 4)), 40),
    "mvue24_approx": (lambda x: nm_prune(x, 2, 4, method="mvue_approx"),
                      lambda k: (lambda x: k.nm.nm_prune(x, 2, 4, method="mvue_approx")), 40),
    "mse24": (lambda x: nm_prune(x, 2, 4, method="mse"), lambda k: (lambda x: k.nm.nm_prune(x, 2, 4, method="mse")), 30),
    "int4": (lambda x: int_quant(x, 4), lambda k: (lambda x: k.intq.int_quant(x, 4)), 12),
    "mvue24_luq4": (lambda x: luq(nm_prune(x, 2, 4)), lambda k: (lambda x: k.fused.nm_luq(x, 2, 4)), 50),
    "nvfp4_rtn": (lambda x: fp4.nvfp4(x), lambda k: (lambda x: k.fp4.nvfp4(x)), 20),
    "nvfp4_sr": (lambda x: fp4.nvfp4(x, rounding="sr"), lambda k: (lambda x: k.fp4.nvfp4(x, rounding="sr")), 20),
    "mxfp4_rtn": (lambda x: fp4.mxfp4(x), lambda k: (lambda x: k.fp4.mxfp4(x)), 20),
    "mxfp4_sr": (lambda x: fp4.mxfp4(x, rounding="sr"), lambda k: (lambda x: k.fp4.mxfp4(x, rounding="sr")), 20),
    "luq4_b16": (lambda x: fp4.block_luq(x), lambda k: (lambda x: k.fp4.block_luq(x)), 20),
}
# the CPU twins (what the dispatcher runs for CPU tensors; the others run their reference there)
CPU_TWINS = {
    "luq4": lambda x: cpu_twins.luq(x, 4),
    "mvue12": lambda x: cpu_twins.nm_prune(x, 1, 2),
    "mvue24": lambda x: cpu_twins.nm_prune(x, 2, 4),
    "mvue24_approx": lambda x: cpu_twins.nm_prune(x, 2, 4, method="mvue_approx"),
    "mvue24_luq4": lambda x: cpu_twins.luq(cpu_twins.nm_prune(x, 2, 4)),
    "mse24": lambda x: cpu_twins.nm_prune(x, 2, 4, method="mse"),
    "nvfp4_rtn": lambda x: cpu_twins.nvfp4(x),
    "nvfp4_sr": lambda x: cpu_twins.nvfp4(x, rounding="sr"),
    "mxfp4_rtn": lambda x: cpu_twins.mxfp4(x),
    "mxfp4_sr": lambda x: cpu_twins.mxfp4(x, rounding="sr"),
    "luq4_b16": lambda x: cpu_twins.block_luq(x),
}


def fmt_size(n: int) -> str:
    for unit, s in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= s and n % s == 0:
            return f"{n // s}{unit}"
    return str(n)


def timeit(fn, x, repeat: int, warmup: int, cuda: bool) -> float:
    """Median seconds of fn(x)."""
    for _ in range(warmup):
        fn(x)
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(repeat):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(x)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(repeat):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernels_usable(device: str) -> tuple[bool, str]:
    if not triton_available():
        return False, "triton not importable"
    if device == "cuda":
        return (not interpreter_enabled()), "TRITON_INTERPRET=1 set on a GPU run"
    return interpreter_enabled(), "CPU: kernels only with --interpret (Triton interpreter, 250-1400x slower)"


def bench_estimators(args, device: str, dtype: torch.dtype) -> tuple[list[str], list[str]]:
    cuda = device == "cuda"
    notes = []
    use_kernel, why = kernels_usable(device)
    if not use_kernel:
        notes.append(f"kernel column skipped: {why}")
    if use_kernel:
        import lowprec.kernels.fp4
        import lowprec.kernels.fused
        import lowprec.kernels.intq
        import lowprec.kernels.luq
        import lowprec.kernels.nm  # noqa: F401
        kmods = sys.modules["lowprec.kernels"]
    free = torch.cuda.mem_get_info()[0] if cuda else 8 << 30  # CPU: stay well inside RAM
    esize = torch.tensor([], dtype=dtype).element_size()
    compiled = {}
    lines = ["| estimator | elements | impl | time | GB/s | vs eager | % of copy BW |", "|---|---:|---|---:|---:|---:|---:|"]
    for size in args.sizes:
        x = None
        copy_gbs = None
        if cuda and 3 * size * esize < free:
            x = torch.randn(ROWS, size // ROWS, device=device, dtype=dtype)
            t = timeit(lambda v: v.clone(), x, args.repeat, args.warmup, cuda)
            copy_gbs = 2 * size * esize / t / 1e9
            lines.append(f"| copy (x.clone) | {fmt_size(size)} | torch | {t * 1e3:.3f} ms | {copy_gbs:.0f} | | 100% |")
        for name in args.estimators:
            ref, kfac, mem = ESTIMATORS[name]
            nominal = 2 * size * esize
            impls = []
            if mem * size * 4 < 0.5 * free:
                impls.append(("ref eager", ref))
                if not args.no_compile:
                    if name not in compiled:
                        compiled[name] = torch.compile(ref, dynamic=False)
                    impls.append(("ref compile", compiled[name]))
            else:
                notes.append(f"{name} {fmt_size(size)}: reference skipped (needs ~{mem * size * 4 / 2**30:.0f} GiB)")
            if not cuda and name in CPU_TWINS:
                impls.append(("cpu twin", CPU_TWINS[name]))
            if use_kernel and 3 * size * esize < 0.8 * free and (cuda or size <= args.interpret_max):
                impls.append(("triton" + ("" if cuda else " (interp)"), kfac(kmods)))
            if not impls:
                continue
            if x is None:
                x = torch.randn(ROWS, size // ROWS, device=device, dtype=dtype)
            eager_t = None
            for label, fn in impls:
                warm = args.warmup + (1 if label == "ref compile" else 0)  # first call compiles
                try:
                    t = timeit(fn, x, args.repeat if "interp" not in label else 1, warm if "interp" not in label else 0,
                               cuda)
                except torch.OutOfMemoryError:
                    notes.append(f"{name} {fmt_size(size)} {label}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                if label == "ref eager":
                    eager_t = t
                gbs = nominal / t / 1e9
                rel = f"{eager_t / t:.2f}x" if eager_t else ""
                frac = f"{100 * gbs / copy_gbs:.0f}%" if copy_gbs else ""
                lines.append(f"| {name} | {fmt_size(size)} | {label} | {t * 1e3:.3f} ms | {gbs:.2f} | {rel} | {frac} |")
                print(lines[-1], flush=True)
        del x
        if cuda:
            torch.cuda.empty_cache()
    return lines, notes


def bench_training(args, device: str) -> tuple[list[str], list[str]]:
    notes = []
    try:
        import torchvision
        from lowprec.convert import convert
    except Exception as e:  # noqa: BLE001 - report, do not fail the kernel table
        return [], [f"training step skipped: {type(e).__name__}: {e}"]
    # What the estimators will run here (LOWPREC_BACKEND honoured), from the dispatcher itself.
    backend = {"triton": "triton kernels", "reference": "reference"}[resolve(torch.empty(0, device=device), None)]
    if backend == "reference" and device == "cpu" and os.environ.get("LOWPREC_BACKEND", "auto") == "auto":
        backend = f"CPU twins, {native.status()}"
    cuda = device == "cuda"
    arch, batch, res = ("resnet50", 64, 224) if cuda else ("resnet18", args.train_batch, 32)
    lines = [f"{arch}, batch {batch}, {res}x{res}, fp32, SGD(lr=0.01, momentum=0.9); estimator backend: {backend}", "",
             "| config | step time | vs fp32 |", "|---|---:|---:|"]
    g = torch.Generator(device="cpu").manual_seed(0)
    data = torch.randn(batch, 3, res, res, generator=g).to(device)
    target = torch.randint(0, 10, (batch,), generator=g).to(device)
    base = None
    for label, fwd, grad in (("fp32", "fp32", "fp32"), ("grad=luq4", "fp32", "luq4"), ("grad=mvue24", "fp32", "mvue24"),
                             ("fwd=int4", "int4", "fp32")):
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(num_classes=10).to(device)
        if (fwd, grad) != ("fp32", "fp32"):
            convert(model, fwd=fwd, grad=grad)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(_):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(data), target).backward()
            opt.step()

        t = timeit(step, None, args.train_steps, 2, cuda)
        base = base or t
        lines.append(f"| {label} | {t * 1e3:.1f} ms | {t / base:.2f}x |")
        print(lines[-1], flush=True)
    return lines, notes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few sizes and repeats (CPU: a few minutes)")
    p.add_argument("--interpret", action="store_true", help="CPU: also time the kernels in Triton's interpreter")
    p.add_argument("--sizes", type=lambda s: [int(float(v)) for v in s.split(",")], default=None,
                   help="comma-separated element counts (default: 64K..256M on GPU, 64K..4M on CPU)")
    p.add_argument("--estimators", type=lambda s: s.split(","), default=list(ESTIMATORS))
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--no-train", action="store_true", help="skip the training-step figure")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--interpret-max", type=int, default=1 << 20, help="largest size run in the interpreter")
    p.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not interpreter_enabled() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.sizes is None:
        if device == "cuda":
            args.sizes = [1 << k for k in range(16, 29, 2)]  # 64K .. 256M
            args.sizes = args.sizes[::3] if args.quick else args.sizes
        else:
            args.sizes = [1 << 16, 1 << 20] if args.quick else [1 << k for k in range(16, 23, 2)]  # 64K .. 4M
    args.sizes = [max(ROWS * 8, (s // (ROWS * 8)) * ROWS * 8) for s in args.sizes]  # [256, tokens], tokens % 8 == 0
    args.repeat = args.repeat or (3 if args.quick else (20 if device == "cuda" else 5))
    args.warmup = 1 if device == "cpu" else 3
    unknown = set(args.estimators) - set(ESTIMATORS)
    if unknown:
        p.error(f"unknown estimators {sorted(unknown)}; choose from {list(ESTIMATORS)}")

    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph breaks at the references' host syncs
    logging.getLogger("torch._inductor").setLevel(logging.ERROR)
    for attr in ("recompile_limit", "cache_size_limit"):  # one compile per (estimator, size)
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, 256)

    if device == "cuda":
        hw = torch.cuda.get_device_name()
    else:
        load = ", load average {:.1f} (shared machine: expect noise)".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
        hw = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{load}"
    cmd = " ".join(["python", "scripts/bench_kernels.py", *(sys.argv[1:] if argv is None else argv)])
    head = [f"Command: `{cmd}`",
            f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; device: {device} ({hw}); "
            f"torch {torch.__version__}; dtype {args.dtype}; median of {args.repeat}",
            "GB/s: nominal bytes (input read once + output written once) / time; "
            "vs eager: speed-up over the eager reference.", ""]
    print("\n".join(head), flush=True)
    t0 = time.time()
    table, notes = bench_estimators(args, device, dtype)
    train, tnotes = ([], []) if args.no_train else bench_training(args, device)
    text = "\n".join(head + ["## Estimators", ""] + table + [""]
                     + ([f"- {n}" for n in notes + tnotes] + [""] if notes or tnotes else [])
                     + (["## Training step", ""] + train + [""] if train else [])
                     + [f"Total benchmark wall time: {time.time() - t0:.0f} s", ""])
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
