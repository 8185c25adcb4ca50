"""Sharded evaluation: one eval job's points split over several GPUs, merged back.

One job is one Ray task, so a 10,000-point AutoAttack would use one GPU however many
the cluster has. A large job's points are cut into shards, contiguous ranges whose
bounds are multiples of the job's batch size: ``run_chunks`` seeds each chunk from
(seed, where the chunk starts among the job's points), so a shard computes for its
points exactly what the unsharded run computes for them, and the merged per-example
outcomes, metrics and adversarial examples are the unsharded run's.

The job's own task attacks the first shard on the GPU it already holds, while every
other shard is a Ray task of its own asking for the job's ``num_gpus`` (a parent that
only waited would keep its GPU idle, and Ray does not lend a blocked task's GPU out).
Each shard checkpoints under its own name (``job-<id>-shard-<start>-<stop>``: a
different split never resumes another's state). A shard whose worker or node is lost
is retried by Ray (``SHARD_RETRIES``) and resumes from its checkpoint; a shard that
fails with a ``GauntletError`` fails the job with that message. Shards share the
job's deadline (``workers.fanout``) and its artifact store address.

Not sharded: attacks fitted on the training split (``needs_train_data``: universal
perturbations, patches), which fit once on the whole job, and ``eps_sweep`` jobs,
whose curve reruns every budget; without Ray (the local executor) only an explicit
``shard_size`` shards, and its shards run one after another in the job's process.
"""

from __future__ import annotations

import math
import time

import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks import AttackResult, tallies
from gauntlet.workers.checkpoint import Checkpoint
from gauntlet.workers.fanout import _DEADLINE, _cancel_late, _past_deadline, _recorded

# Ray reruns a shard whose worker died this many times (its own exceptions it never
# reruns); past that the job fails as transient and the scheduler's retry resumes it.
SHARD_RETRIES = 2
# Below this many batches a job is not worth splitting on its own.
MIN_BATCHES = 4


def _ray_worker():
    """Ray, when this process is a Ray worker (the job runs as a task), else None."""
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            return ray
    except Exception:  # noqa: BLE001 - not under Ray: the job runs unsharded
        return None
    return None


def _under_ray():
    try:
        import ray
    except ImportError:
        return None
    return ray if ray.is_initialized() else None


def cluster_gpus(ray) -> float:
    """GPUs over the cluster's alive nodes."""
    return sum(node["Resources"].get("GPU", 0.0) for node in ray.nodes() if node["Alive"])


def plan(ctx, attack) -> list[tuple[int, int]] | None:
    """The shards' (start, stop), or None when the job runs whole.

    ``shard_size`` from the spec, else (under Ray, with 2 or more GPUs, and at least
    ``MIN_BATCHES`` batches of points) one shard per GPU; either way rounded up to a
    multiple of the batch size, and a split into a single shard is no split.
    """
    spec = ctx.spec
    if attack.needs_train_data or spec.get("eps_sweep"):
        return None
    n, batch_size = len(ctx.eval_data[0]), ctx.batch_size
    size = spec.get("shard_size")
    if size is None:
        if n < MIN_BATCHES * batch_size:
            return None  # before asking the cluster, which costs more than a small job
        ray = _ray_worker()
        gpus = cluster_gpus(ray) if ray else 0
        if gpus < 2:
            return None
        size = math.ceil(n / int(gpus))
    size = math.ceil(int(size) / batch_size) * batch_size
    bounds = [(start, min(start + size, n)) for start in range(0, n, size)]
    return bounds if len(bounds) > 1 else None


def _job(ctx, start: int, stop: int) -> dict:
    """What a shard task needs to rebuild the job's context: the task entry's payload."""
    name = ctx.checkpoint_name and f"{ctx.checkpoint_name}-shard-{start}-{stop}"
    return {
        "spec": ctx.spec,
        "model": ctx.model,
        "artifacts": ctx.artifacts,  # the parent's store address: same store, same blobs
        "data_root": ctx.data_root,
        "others": ctx.others,
        "checkpoint": name,
        "start": start,
        "stop": stop,
        "batch_size": ctx.batch_size,  # the parent's: a GPU's own choice would reseed chunks
    }


def _attack_shard(ctx, pieces, job: dict, progress=None) -> dict:
    """Run ``run_chunks`` on one shard's points; its per-example state, as tensors."""
    from gauntlet.workers.jobs.eval import run_chunks

    surface, _, _, attack, k, threat = pieces
    start, stop = job["start"], job["stop"]
    x, y, _ = ctx.eval_data
    checkpoint = Checkpoint(ctx.store, job["checkpoint"]) if job["checkpoint"] else None
    saved = checkpoint.load() if checkpoint else None
    resumed = int(saved["done"]) if saved and "done" in saved else 0
    result, rejected, per_draw = run_chunks(
        attack,
        surface,
        ctx.defended,
        x[start:stop],
        y[start:stop],
        threat,
        seed=ctx.seed,
        batch_size=job["batch_size"],
        checkpoint=checkpoint,
        progress=progress,
        k=k,
        offset=start,
    )
    return {
        "x_adv": result.x_adv.detach().cpu(),
        "clean": result.clean_correct.cpu(),
        "robust": result.robust.cpu(),
        "rejected": rejected,
        "draws": per_draw,
        "queries": None if result.queries is None else result.queries.cpu(),
        "grad_evals": result.grad_evals,
        "tallies": tallies.counts(attack),
        "resumed_from": resumed,
    }


def run_shard(job: dict) -> dict:
    """A shard's Ray task: the job's context rebuilt, its attack run on the shard.

    A ``GauntletError`` comes back as ``{"error": message}`` (a permanent failure, which
    Ray must not rerun); anything else raises, and a dead worker is rerun by Ray.
    """
    from gauntlet.workers.context import JobContext
    from gauntlet.workers.jobs.eval import prepare

    try:
        ctx = JobContext(
            spec=job["spec"],
            model=job["model"],
            artifacts=job["artifacts"],
            data_root=job["data_root"],
            others=dict(job["others"] or {}),
        )
        ctx.__dict__["batch_size"] = job["batch_size"]  # the cached property, preset
        return _attack_shard(ctx, prepare(ctx), job)
    except GauntletError as exc:
        return {"error": str(exc)}


def attack_sharded(ctx, attack, bounds):
    """(result, rejected, per-draw, sub-task records, shard summaries) of the whole job,
    merged from its shards in order: what ``run_chunks`` gives for all points at once."""
    from gauntlet.workers.jobs.eval import prepare

    n = bounds[-1][1]
    jobs = [_job(ctx, start, stop) for start, stop in bounds]
    done = [0] * len(bounds)

    def report(i: int, count: int) -> None:
        done[i] = count
        ctx.report(sum(done), n)

    ray = _under_ray()
    refs = _submit(ray, ctx, jobs[1:]) if ray else []
    outputs: list = [None] * len(jobs)
    try:
        # The job's own GPU takes the first shard while the others run elsewhere.
        for i in range(1 if ray else len(jobs)):
            progress = lambda d, _, i=i: report(i, d)  # noqa: E731
            args = (ctx, prepare(ctx), jobs[i], progress)
            outputs[i] = _recorded(f"shard-{i}", _attack_shard, args)
        if ray:
            _collect(ray, refs, outputs, jobs, report)
        for output in outputs:
            if output is not None and "error" in output[0]:
                raise GauntletError(output[0]["error"])
    except BaseException:
        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - finished meanwhile: nothing left to stop
                pass
        raise
    values = [value for value, _ in outputs]
    merged = _merge(values, attack)
    for job in jobs:
        if job["checkpoint"]:
            Checkpoint(ctx.store, job["checkpoint"]).clear()
    summary = [
        {"start": j["start"], "stop": j["stop"], "resumed_from": v["resumed_from"]}
        for j, v in zip(jobs, values, strict=True)
    ]
    return (*merged, [record for _, record in outputs], summary)


def _submit(ray, ctx, jobs: list[dict]) -> list:
    """Each shard as a Ray task with the job's GPUs; Ray reruns one whose worker died."""
    num_gpus = float((ctx.spec.get("resources") or {}).get("num_gpus") or 0.0)
    available = ray.cluster_resources().get("GPU", 0.0)
    if num_gpus > available:
        raise GauntletError(
            f"each shard asks for {num_gpus:g} GPUs, but the cluster has {available:g}"
        )
    remote = ray.remote(max_retries=SHARD_RETRIES)(_recorded)
    deadline = _DEADLINE.get()
    return [
        remote.options(
            num_gpus=num_gpus, num_cpus=1, name=f"gauntlet-shard-{job['start']}-{job['stop']}"
        ).remote(f"shard-{i}", run_shard, (job,), deadline)
        for i, job in enumerate(jobs, 1)
    ]


def _collect(ray, refs: list, outputs: list, jobs: list[dict], report) -> None:
    """Wait for the shard tasks (until the job's deadline), filling ``outputs`` in order."""
    position = {ref: i for i, ref in enumerate(refs, 1)}
    waiting = list(refs)
    deadline = _DEADLINE.get()
    while waiting:
        timeout = None if deadline is None else max(0.0, deadline[0] - time.time())
        finished, waiting = ray.wait(waiting, num_returns=1, timeout=timeout)
        if not finished:
            if _past_deadline():
                names = [f"shard-{position[r]}" for r in waiting]
                _cancel_late(ray, waiting, names, len(jobs))
            continue  # woke a moment early
        i = position[finished[0]]
        outputs[i] = ray.get(finished[0])  # a shard that died past its retries raises
        if "error" in outputs[i][0]:
            return  # a permanent failure: no use waiting for the others
        report(i, jobs[i]["stop"] - jobs[i]["start"])


def _merge(values: list[dict], attack) -> tuple[AttackResult, torch.Tensor, torch.Tensor]:
    """The shards' per-example state, concatenated in order; counts summed."""
    queries = [v["queries"] for v in values]
    if all(q is None for q in queries):
        merged_queries = None
    else:
        sizes = [len(v["clean"]) for v in values]
        merged_queries = torch.cat(
            [
                torch.zeros(s, dtype=torch.int64) if q is None else q
                for q, s in zip(queries, sizes, strict=True)
            ]
        )
    # The job reports the whole run's counts, which the parent's attack object only saw
    # a shard of.
    tallies.restore(attack, tallies.total([v["tallies"] for v in values]))
    result = AttackResult(
        x_adv=torch.cat([v["x_adv"] for v in values]),
        clean_correct=torch.cat([v["clean"] for v in values]),
        robust=torch.cat([v["robust"] for v in values]),
        grad_evals=sum(int(v["grad_evals"]) for v in values),
        queries=merged_queries,
    )
    rejected = torch.cat([v["rejected"] for v in values])
    per_draw = torch.cat([v["draws"] for v in values], dim=2)
    return result, rejected, per_draw
