"""Benchmark: every white-box attack's wall time against its forward+backward bound.

Run from the repository root: ``python bench/whitebox.py``. On an undefended CNN trained
on digits, each attack runs once to record how many examples each of its forward +
input-gradient passes covered (``AttackResult.active_per_step``); the bound replays
exactly those passes, plus the one clean forward pass every evaluation needs. The
printed ratio ours / bound is the attack's own overhead (projection, bookkeeping,
extra forward checks, DeepFool's per-class gradients, CW's binary search).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attacks import best_times, clean_pass, cnn, digits, replay_bound, train  # noqa: E402

from gauntlet.workers.attacks import Threat, build_attack  # noqa: E402

SETTINGS = [
    ("fgsm", {}, "linf"),
    ("bim", {}, "linf"),
    ("mi-fgsm", {}, "linf"),
    ("r-fgsm", {}, "linf"),
    ("pgd", {"steps": 40}, "linf"),
    ("pgd-targeted", {"steps": 40}, "linf"),
    ("apgd-ce", {"steps": 100}, "linf"),
    ("apgd-dlr", {"steps": 100}, "linf"),
    ("apgd-t", {"steps": 100}, "linf"),
    ("fab-t", {"steps": 100}, "linf"),
    ("pgd", {"steps": 40}, "l2"),
    ("deepfool", {}, "l2"),
    ("cw-l2", {"steps": 100, "binary_steps": 5}, "l2"),
]
EPS = {"linf": 0.3, "l2": 2.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_train, y_train, x, y = digits(8)
    model = train(cnn(8, 16), x_train, y_train, epochs=10)
    x, y = x[: args.n], y[: args.n]
    print(f"torch {torch.__version__}, {args.threads} threads, digits 8x8, n={len(x)}")
    print(
        f"{'attack':<14}{'threat':<12}{'robust':>8}{'passes':>9}{'ours s':>9}"
        f"{'bound s':>9}{'ours/bound':>12}"
    )
    for name, params, norm in SETTINGS:
        attack = build_attack(name, params)
        threat = Threat(norm, EPS[norm])

        def ours(attack=attack, threat=threat):
            return attack(model, x, y, threat, generator=torch.Generator().manual_seed(0))

        result = ours()
        counts = result.active_per_step
        times = best_times(
            {
                "ours": ours,
                "bound": lambda c=counts: (replay_bound(model, x, y, c), clean_pass(model, x, 256)),
            },
            args.repeats,
        )
        print(
            f"{name:<14}{norm + ' ' + str(EPS[norm]):<12}"
            f"{result.robust.float().mean().item():>8.3f}{sum(counts):>9}"
            f"{times['ours']:>9.3f}{times['bound']:>9.3f}{times['ours'] / times['bound']:>12.2f}"
        )


if __name__ == "__main__":
    main()
