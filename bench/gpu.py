"""Benchmark: PGD and AutoAttack throughput on GPU-sized models at CIFAR-10 shapes.

Run from the repository root: ``python bench/gpu.py`` (on a CUDA machine; ``--smoke``
runs a tiny version anywhere to check the script itself). For PreAct-ResNet-18 and
WRN-28-10 with random weights (throughput does not depend on them), on 3x32x32 inputs:

- the raw bound: seconds per example of one forward and backward pass at the batch
  size gauntlet picks (``workers.gpu``), and PGD-k's bound, k times that;
- our PGD-k: examples per second and its time over the bound (target about 1.1);
- the tuning tolerance: PGD robust accuracy with the GPU tuning on (channels-last,
  cuDNN benchmark, TF32) against plain float32 on the same points (points that differ;
  stated tolerance 0.5%);
- AutoAttack: our ``autoattack`` over torchattacks' AutoAttack (the reference's port),
  same model and points, their robust accuracies.

Labels are the model's own predictions, so with random weights every point is
correctly classified and every attack does its full work.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script

from gauntlet.workers import gpu  # noqa: E402
from gauntlet.workers.architectures import build_architecture  # noqa: E402
from gauntlet.workers.attacks import Threat, build_attack  # noqa: E402
from gauntlet.workers.models import InputSpec  # noqa: E402

EPS = 8 / 255


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def model_for(arch: str, device, *, tuned: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_architecture(arch, InputSpec(3, 32, 32, 10)).to(device).eval()
    if tuned:
        return gpu.prepare_model(net, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return net


def forward_backward_seconds(model, x) -> float:
    """One forward and backward pass of the whole batch: the floor of one PGD step."""
    device = x.device

    def step():
        xg = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xg), model(x).argmax(1).detach())
        (grad,) = torch.autograd.grad(loss, xg)
        return grad

    step()  # warm-up (cuDNN picks its kernels)
    _, seconds = timed(step, device)
    return seconds


def pgd(model, x, y, steps, batch):
    attack = build_attack("pgd", {"steps": steps, "restarts": 1})
    generator = torch.Generator(device=x.device).manual_seed(0)
    return attack(model, x, y, Threat("linf", EPS), batch_size=batch, generator=generator)


def bench_model(arch: str, args, device) -> dict:
    model = model_for(arch, device, tuned=True)
    batch = gpu.auto_batch_size(model, (3, 32, 32), device, floor=args.batch, cap=args.n)
    x = torch.rand(
        args.n, 3, 32, 32, device=device, generator=torch.Generator(device).manual_seed(1)
    )
    with torch.no_grad():
        y = torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])
    # The bound counts one extra clean forward per point, as PGD's first check does.
    per_batch = forward_backward_seconds(model, x[:batch])
    bound = per_batch * (len(x) / batch) * args.steps
    pgd(model, x[:batch], y[:batch], 1, batch)  # warm-up
    tuned, seconds = timed(lambda: pgd(model, x, y, args.steps, batch), device)
    row = {
        "arch": arch,
        "batch": batch,
        "pgd_examples_per_s": len(x) / seconds,
        "pgd_over_bound": seconds / bound,
        "pgd_robust_tuned": tuned.robust.float().mean().item(),
    }
    plain_model = model_for(arch, device, tuned=False)
    plain = pgd(plain_model, x, y, args.steps, batch)
    row["pgd_robust_fp32"] = plain.robust.float().mean().item()
    row["points_differing"] = int((plain.robust != tuned.robust).sum())
    gpu.configure(device)  # back to the tuned kernels for AutoAttack
    row.update(autoattack_ratio(model, x[: args.aa_n], y[: args.aa_n], args, device, batch))
    return row


def autoattack_ratio(model, x, y, args, device, batch) -> dict:
    import torchattacks

    ours = build_attack("autoattack", {"steps": args.aa_steps, "queries": args.queries})
    generator = torch.Generator(device=device).manual_seed(0)
    result, ours_s = timed(
        lambda: ours(model, x, y, Threat("linf", EPS), batch_size=batch, generator=generator),
        device,
    )
    reference = torchattacks.AutoAttack(model, norm="Linf", eps=EPS, n_classes=10, seed=0)
    for member in reference._autoattack.attacks:
        if hasattr(member, "steps"):
            member.steps = args.aa_steps
        if hasattr(member, "n_queries"):
            member.n_queries = args.queries
    x_ref, ref_s = timed(lambda: reference(x, y), device)
    with torch.no_grad():
        ref_robust = (model(x_ref).argmax(1) == y).float().mean().item()
    return {
        "aa_ours_s": ours_s,
        "aa_reference_s": ref_s,
        "aa_ratio": ours_s / ref_s,
        "aa_robust_ours": result.robust.float().mean().item(),
        "aa_robust_reference": ref_robust,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128, help="floor of the batch size")
    parser.add_argument("--aa-n", type=int, default=256)
    parser.add_argument("--aa-steps", type=int, default=100)
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--archs", default="preact-resnet18,wrn-28-10")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.steps, args.batch, args.aa_n, args.aa_steps, args.queries = 8, 2, 8, 4, 2, 20
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; n={args.n}, PGD-{args.steps}")
    for arch in args.archs.split(","):
        row = bench_model(arch, args, device)
        print(
            f"{arch}: batch {row['batch']}; PGD {row['pgd_examples_per_s']:.1f} examples/s, "
            f"{row['pgd_over_bound']:.2f}x the forward+backward bound; robust acc tuned "
            f"{row['pgd_robust_tuned']:.4f} vs float32 {row['pgd_robust_fp32']:.4f} "
            f"({row['points_differing']} of {args.n} points differ; tolerance 0.5%)"
        )
        print(
            f"{arch}: autoattack {row['aa_ours_s']:.2f} s vs reference "
            f"{row['aa_reference_s']:.2f} s (ratio {row['aa_ratio']:.2f}); "
            f"robust acc {row['aa_robust_ours']:.4f} vs "
            f"{row['aa_robust_reference']:.4f}"
        )


if __name__ == "__main__":
    main()
