"""Bias and variance of every registered gradient estimator on a log-normal tensor, at a glance.

    python scripts/check_estimators.py [--numel 16384] [--sigma 2] [--seed 0]

For each estimator (the update-GEMM estimator of each grad recipe) it prints the relative bias
‖mean_K δ̂ - δ‖/‖δ‖ at K = 1, 16, 256, the floor an unbiased estimator with the measured variance
would show at K = 256 (sqrt(Var/256)/‖δ‖), the measured relative variance Σ Var/‖δ‖² and its
closed form where one exists. Unbiased estimators fall like 1/√K down to the floor; biased ones
(mse, fp4_rdn, radix4, the block formats' rtn rules) stay put. The block FP4 rows use the update
GEMM's estimator (blocks along tokens); last, the clipping the rtn scale rules (OCP MX, NVFP4's
E4M3-rounded scale) cause on their own.
"""

import argparse

import torch

import lowprec as lp


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=16384)
    ap.add_argument("--sigma", type=float, default=2.0, help="log-normal sigma of the magnitudes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    mag = torch.exp(args.sigma * torch.randn(args.numel, generator=g))
    delta = torch.where(torch.rand(args.numel, generator=g) < 0.5, -mag, mag)
    # Laid out [C_out, tokens] as a layer hands δ to N:M estimators (blocks along tokens).
    delta = delta.reshape(64, -1)

    print(f"δ: {tuple(delta.shape)} log-normal magnitudes (sigma={args.sigma}), random signs, seed={args.seed}")
    head = f"{'estimator':<15}{'unbiased':>9}{'bias@1':>10}{'bias@16':>10}{'bias@256':>10}{'floor@256':>11}" \
           f"{'rel_var':>11}{'closed form':>13}{'zeros':>7}"
    print(head)
    print("-" * len(head))
    for name in lp.GRAD_NAMES:
        est = lp.grad_recipe(name).update
        if est is None:
            continue
        samples = lp.grad_recipe(name).samples
        if samples > 1:  # SMP: the update GEMM sees the mean of `samples` draws
            est = lp.SMP(est, samples)
        s = lp.estimator_stats(delta, est, ks=(1, 16, 256), generator=g)
        bias = [s[f"bias@{k}"] for k in (1, 16, 256)]
        var, theory = s["rel_var"], s["rel_var_theory"]
        floor = s["bias_floor@256"]
        print(f"{name:<15}{str(est.unbiased):>9}{bias[0]:>10.4f}{bias[1]:>10.4f}{bias[2]:>10.4f}{floor:>11.4f}"
              f"{var:>11.3e}{'-' if theory is None else f'{theory:.3e}':>13}{s['zero_frac']:>7.2f}")

    # The block formats' published (rtn) scale rules clip: how much of their bias is clipping alone.
    gauss = torch.randn(delta.shape, generator=g)
    print("\nrtn scale rules, blocks along tokens: clipped fraction, clipping-only relative bias ‖(y-6)+·scale‖/‖δ‖")
    for fmt in ("nvfp4", "mxfp4"):
        for label, t in (("log-normal δ", delta), ("gaussian", gauss)):
            c = lp.scale_clip_stats(t, fmt, dim=-1)
            print(f"  {fmt:<6} {label:<13} clipped {c['clip_frac']:.4f}  bias {c['clip_rel_bias']:.4f}")


if __name__ == "__main__":
    main()
