"""Benchmark: one eval job's makespan as 1 shard and as 2 shards on 2 logical GPUs.

Run from the repository root: ``python bench/shards.py`` (``--n``, ``--steps``,
``--batch-size``). The job is PGD (Linf 0.02) on ``digits-28`` against a small CNN
trained briefly, submitted as the Ray executor submits it: ``run_job`` as a task
holding one GPU of a local Ray with 2 logical GPUs and 2 CPUs. With ``shard_size`` n
it runs whole; with n/2 the job's own task attacks the first half while the second
half is a Ray task on the other GPU (``workers.shards``). Printed: both makespans
(submit to result, workers warmed first), the ideal (1-shard / 2), the ratio of the
2-shard makespan to it (1.0 is ideal), and whether the two results are the same bytes.

Logical GPUs are labels: the work runs on the CPU, and the two shards share the
machine's cores, so on 2 cores (one per shard) the ideal is bounded by the cores and
by each worker's fixed start-up and model loading.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script

from gauntlet.cluster.artifacts import ArtifactStore  # noqa: E402
from gauntlet.scheduler.spec import JobSpec, Resources  # noqa: E402
from gauntlet.workers.datasets import load_split  # noqa: E402
from gauntlet.workers.models import InputSpec, save_classifier  # noqa: E402
from gauntlet.workers.task import run_job  # noqa: E402
from gauntlet.workers.training import train_classifier  # noqa: E402

# A small Linf budget: most correctly classified points stay robust for every step.
EPS = 0.02


def _model(root: Path) -> dict:
    """A small CNN trained briefly (off the clock): PGD attacks only points it gets right,
    and a small budget keeps most of them robust, so every step runs on most points."""
    spec = InputSpec(1, 28, 28, 10)
    x, y = load_split("digits-28", "train", root)
    path = root / "cnn.safetensors"
    save_classifier(train_classifier(x, y, arch="small-cnn", spec=spec, epochs=3), path)
    return {
        "id": "b" * 64,
        "name": "cnn",
        "arch": "small-cnn",
        "dataset": "digits-28",
        "input_spec": spec.to_dict(),
        "weights_sha256": ArtifactStore(root / "artifacts").put_file(path),
    }


def _payload(args, root: Path, model: dict, shard_size: int, job_id: int) -> dict:
    spec = JobSpec(
        model_id=model["id"],
        dataset="digits-28",
        attack="pgd",
        params={"steps": args.steps},
        norm="linf",
        eps=EPS,
        n=args.n,
        batch_size=args.batch_size,
        resources=Resources(num_gpus=1),
        shard_size=shard_size,
    )
    spec.validate()
    return {
        "spec": spec.to_dict(),
        "model": model,
        "artifacts": str(root / "artifacts"),
        "data_root": str(root),
        "job_id": job_id,
        "keep_adversarial": False,
    }


def _run(ray, task, payload: dict):
    start = time.perf_counter()
    result = ray.get(task.remote(payload))
    if not hasattr(result, "metrics"):
        raise SystemExit(f"the job failed: {result.message}")
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()
    import ray

    ray.init(num_gpus=2, num_cpus=2, include_dashboard=False, logging_level="ERROR")
    task = ray.remote(max_retries=0)(run_job).options(num_gpus=1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = _model(root)
        half = args.n // 2
        # Warm-up: both workers start, import torch and load the model off the clock.
        _run(
            ray,
            task,
            _payload(argparse.Namespace(**{**vars(args), "steps": 1}), root, model, half, 1),
        )
        one, whole = _run(ray, task, _payload(args, root, model, args.n, 2))
        two, split = _run(ray, task, _payload(args, root, model, half, 3))
    ray.shutdown()
    ideal = one / 2
    same = (whole.metrics, whole.clean, whole.robust) == (split.metrics, split.clean, split.robust)
    same = same and (
        whole.details["provenance"]["adversarial_sha256"]
        == split.details["provenance"]["adversarial_sha256"]
    )
    print(
        f"machine: {os.cpu_count()} CPU cores, Ray with 2 logical GPUs and 2 CPUs; the "
        "logical GPUs share the cores, so the ideal is bounded by them"
    )
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"load average when done: {load} (other processes on the cores slow both runs)")
    print(
        f"job: PGD-{args.steps} Linf {EPS:g} on {args.n} digits-28 points, small CNN "
        f"(trained 3 epochs), batch {args.batch_size}"
    )
    for record in split.subtasks:
        took = (record.finished_at - record.started_at).total_seconds()
        print(f"  {record.name}: {took:.2f} s on GPU {','.join(record.gpu_ids) or '-'}")
    print(f"1 shard:  makespan {one:.2f} s")
    print(f"2 shards: makespan {two:.2f} s (speed-up {one / two:.2f}x)")
    print(f"ideal (1 shard / 2): {ideal:.2f} s; 2-shard makespan / ideal = {two / ideal:.2f}")
    print(f"merged result identical to the unsharded one: {same}")


if __name__ == "__main__":
    main()
