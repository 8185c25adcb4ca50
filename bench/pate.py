"""Benchmark: PATE teachers as parallel Ray tasks against the same teachers in sequence.

Run from the repository root: ``python bench/pate.py`` (``--teachers``, ``--epochs``,
``--cpus``, ``--teacher-gpus``). Both runs train the same teachers (small CNNs on
disjoint partitions of scikit-learn's digits, one core each) with the function a
``pate`` job uses. Printed: both wall times, the speed-up, and the speed-up as a share
of its bound, min(teachers, cpus) (target >= 0.6). Ray starts before the clock does,
but each new worker process still imports torch (seconds), a fixed cost that short
teachers cannot hide: on 2 cores, 4 teachers of 30 epochs reach 0.59 of the bound and
of 120 epochs 0.77.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gauntlet.workers.datasets import eval_subset, load_split  # noqa: E402
from gauntlet.workers.fanout import run_parallel  # noqa: E402
from gauntlet.workers.jobs.pate import check_pate, train_teacher  # noqa: E402
from gauntlet.workers.models import InputSpec  # noqa: E402


def pieces(teachers: int, epochs: int, teacher_gpus: float) -> list[tuple[str, tuple]]:
    x, y = load_split("digits", "train", None)
    queries, _, _ = eval_subset("digits", 200, 0, None)
    settings = check_pate(
        "gnmax", {"teachers": teachers, "epochs": epochs, "teacher_gpus": teacher_gpus}
    )
    spec = InputSpec(1, 8, 8, 10).to_dict()
    parts = np.array_split(np.random.default_rng(0).permutation(len(y)), teachers)
    return [
        (f"teacher-{t}", (x[p], y[p], queries, queries[:8], "small-cnn", spec, settings, False, t))
        for t, p in enumerate(parts)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--teacher-gpus", type=float, default=0.0)
    args = parser.parse_args()
    work = pieces(args.teachers, args.epochs, args.teacher_gpus)

    torch.set_num_threads(1)  # the sequential run gets one core per teacher too
    start = time.perf_counter()
    sequential, _ = run_parallel(train_teacher, work)
    sequential_s = time.perf_counter() - start

    import ray

    gpus = int(torch.cuda.device_count())
    ray.init(num_cpus=args.cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        parallel, records = run_parallel(train_teacher, work, num_gpus=args.teacher_gpus)
        parallel_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    same = all(torch.equal(a[0], b[0]) for a, b in zip(sequential, parallel, strict=True))
    bound = min(args.teachers, args.cpus)
    speedup = sequential_s / parallel_s
    print(f"{args.teachers} teachers, {args.epochs} epochs, {args.cpus} CPUs, {gpus} GPUs")
    print(f"sequential {sequential_s:.1f} s, parallel on Ray {parallel_s:.1f} s")
    print(f"speed-up {speedup:.2f}x; bound {bound}x; share of bound {speedup / bound:.2f}")
    print(f"worker processes used: {len({r.worker_pid for r in records})}")
    print(f"same votes in both runs: {same}")


if __name__ == "__main__":
    main()
