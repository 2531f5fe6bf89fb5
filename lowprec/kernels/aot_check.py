"""Compile every kernel variant ahead of time for a Hopper GPU (sm_90) and check the PTX: LUQ (and its
pack/unpack/amax), every N:M method, the fused N:M-then-LUQ passes, INT quantization and the block
FP4 formats (NVFP4 RTN/SR and 2-D tiles, MXFP4 RTN/SR, block LUQ over 16 and 32).

Needs no GPU (Triton ships ptxas), but needs ``TRITON_INTERPRET=0`` (under the interpreter the
kernels are not compilable objects). Checks that the bit-exact recipe survived compilation: IEEE
division only (no ``div.full`` / ``div.approx`` / ``rcp.approx``), no FMA contraction, no register
spills (``ld/st.local``). Run: ``TRITON_INTERPRET=0 python -m lowprec.kernels.aot_check``.
"""

from __future__ import annotations

import re
import sys


def variants():
    from . import fp4, fused, intq, luq, nm
    from .common import NM_GPU_ELEMS, NM_METHOD_IDS

    import torch

    from .common import dtype_consts

    bf16 = dtype_consts(torch.bfloat16)
    luq_sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "m_ptr": "*fp32", "amax_ptr": "*i32", "noise_ptr": "*bf16",
               "seed": "i32", "n": "i32", "iters": "i32"}
    nm_sig = {"x_ptr": "*fp32", "out_ptr": "*bf16", "flag_ptr": "*i32", "noise_ptr": "*fp32", "seed": "i32",
              "length": "i32", "nblocks": "i32", "inner": "i32", "total": "i32"}
    yield "luq", luq.luq_kernel, luq_sig, dict(L_MINUS_1=6, TRACK_AMAX=True, PACK=False, BLOCK=luq.GPU_BLOCK,
                                               HAS_NOISE=False, **bf16)
    yield "luq_pack", luq.luq_kernel, dict(luq_sig, out_ptr="*u8"), dict(L_MINUS_1=6, TRACK_AMAX=False, PACK=True,
                                                                         BLOCK=luq.GPU_BLOCK, HAS_NOISE=False, **bf16)
    yield "luq_amax", luq.amax_kernel, {"x_ptr": "*fp32", "amax_ptr": "*i32", "n": "i32", "iters": "i32"}, dict(
        BLOCK=luq.AMAX_GPU_BLOCK)
    yield "luq_unpack", luq.unpack_kernel, {"codes_ptr": "*u8", "alpha_ptr": "*fp32", "out_ptr": "*fp16",
                                             "n": "i32"}, dict(BLOCK=luq.GPU_BLOCK)
    for n, m, method in [(1, 2, "mvue"), (2, 4, "mvue"), (2, 8, "mvue"), (4, 8, "mvue"), (2, 4, "mvue_approx"),
                         (1, 4, "mvue_approx"), (2, 4, "mse"), (1, 4, "mse")]:
        k = {"mvue": 1, "mvue_approx": n, "mse": 1}[method]
        yield (f"nm_{method}{n}{m}", nm.nm_kernel, nm_sig,
               dict(N=n, M=m, METHOD=NM_METHOD_IDS[method], K=k, BLOCK=NM_GPU_ELEMS // m, HAS_NOISE=False,
                    DMAX=bf16["DMAX"]))
    for p in (1, 2):
        sig = {"x_ptr": "*fp32", "out_ptr": "*bf16", "flag_ptr": "*i32", "m_ptr": "*i32", "noise_ptr": "*fp32",
               "noise_luq_ptr": "*fp32", "seed": "i32", "seed_luq": "i32", "length": "i32", "nblocks": "i32",
               "inner": "i32", "total": "i32"}
        yield (f"nm_luq_pass{p}", fused.nm_luq_kernel, sig,
               dict(N=2, M=4, METHOD=0, K=1, L_MINUS_1=6, PASS=p, BLOCK=NM_GPU_ELEMS // 4, HAS_NOISE=False, **bf16))
    yield "intq", intq.intq_kernel, {"x_ptr": "*fp16", "out_ptr": "*fp16", "s_ptr": "*fp32", "flag_ptr": "*i32",
                                      "row_len": "i32", "nchunks": "i32", "qlo": "fp32", "qhi": "fp32"}, dict(
        BLOCK=intq.GPU_BLOCK, DMAX=dtype_consts(torch.float16)["DMAX"])
    fp4_sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "amax_ptr": "*fp32", "flag_ptr": "*i32", "seed": "i32",
               "outer": "i32", "length": "i32", "inner": "i32", "nb": "i32", "total": "i32"}
    for name, fmt, sr, lm1, rows, size in [("nvfp4_rtn", "nvfp4", False, 0, 1, 16), ("nvfp4_sr", "nvfp4", True, 0, 1, 16),
                                           ("nvfp4_2d_rtn", "nvfp4", False, 0, 16, 16),
                                           ("mxfp4_rtn", "mxfp4", False, 0, 1, 32), ("mxfp4_sr", "mxfp4", True, 0, 1, 32),
                                           ("luq4_b16", "block_luq", True, 6, 1, 16),
                                           ("luq4_b32", "block_luq", True, 6, 1, 32)]:
        yield (f"fp4_{name}", fp4.block_fp4_kernel, fp4_sig,
               dict(FMT=fp4.FORMATS[fmt], SR=sr, L_MINUS_1=lm1, ROWS=rows, SIZE=size,
                    BLOCK=max(1, fp4.GPU_TILE_ELEMS // (rows * size))))
    yield "intq_stats", intq.stats_kernel, {"x_ptr": "*fp32", "part_ptr": "*fp32", "row_len": "i32",
                                             "nchunks": "i32"}, dict(BLOCK=intq.STATS_GPU_BLOCK)


def compile_sm90(fn, signature: dict, constexprs: dict) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .common import LAUNCH_OPTS

    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                       options=dict(LAUNCH_OPTS))
    return c.asm["ptx"]


def ptx_problems(ptx: str) -> list[str]:
    ops = set(re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", ptx, flags=re.M))
    bad = sorted(o for o in ops if o.startswith(("fma.", "div.full", "div.approx", "rcp.approx")))
    if {"ld.local", "st.local"} & ops:
        bad.append("register spills (ld/st.local)")
    return bad


def main() -> int:
    from . import interpreter_enabled

    if interpreter_enabled():
        print("aot_check: set TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    failed = 0
    for name, fn, sig, cx in variants():
        problems = ptx_problems(compile_sm90(fn, sig, cx))
        failed += bool(problems)
        print(f"{name:18s} {'ok' if not problems else 'FAIL ' + ', '.join(problems)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
