"""Sharded evaluation: a job's points as Ray tasks on several GPUs, merged to one result.

Each test runs the job the way the Ray executor does (``run_job`` as a task holding one
logical GPU) and compares it with the same job run whole, in this process, with the
same seeds: the per-example outcomes, metrics and adversarial examples must be the
same bytes. A shard whose worker is killed mid-way is rerun by Ray and resumes from its
own checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from gauntlet.cluster.artifacts import ArtifactStore
from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler.spec import JobSpec, Resources
from gauntlet.scheduler.suites import parse_suite
from gauntlet.workers.task import run_job, run_spec
from tests.conftest import stored_model
from tests.service_helpers import start_local_ray

pytestmark = pytest.mark.ray

# Points and batch size: 96 points are 6 batches of 16, enough to split three ways.
N, BATCH = 96, 16


@pytest.fixture(scope="module")
def ray_gpus():
    """A local Ray with three logical GPUs: the job's own and two more for its shards."""
    ray = start_local_ray(4, 3)
    yield ray
    ray.shutdown()


@pytest.fixture
def robust_model(tmp_path, digits_models):
    """The FGSM-trained digits CNN in a store: PGD breaks some points, not all."""
    return stored_model(tmp_path / "artifacts", digits_models["robust"], id="r" * 64, name="robust")


def _spec(attack: str, params: dict, **extra) -> dict:
    spec = JobSpec(
        model_id="r" * 64,
        dataset="digits",
        attack=attack,
        params=params,
        norm="linf",
        eps=0.15,
        n=N,
        seed=5,
        batch_size=BATCH,
        resources=Resources(num_gpus=1),
        **extra,
    )
    spec.validate()
    return spec.to_dict()


def _whole(spec: dict, model: dict, store: str, data_root: str):
    """The job in this process, unsharded (the driver is no Ray worker: no auto split)."""
    return run_spec(spec, model, artifacts=store, data_root=data_root, keep_adversarial=False)


def _as_task(ray, spec: dict, model: dict, store: str, data_root: str, job_id: int):
    """``run_job`` as a Ray task with one GPU, as the Ray executor submits it."""
    payload = {
        "spec": spec,
        "model": model,
        "artifacts": store,
        "data_root": data_root,
        "job_id": job_id,
        "keep_adversarial": False,
    }
    return ray.remote(max_retries=0)(run_job).options(num_gpus=1).remote(payload)


def _same_result(sharded, whole, shards: int, *, same_bytes: bool = True) -> None:
    """``same_bytes=False`` holds the outcomes and counts exact, the float metrics to
    1e-6 and leaves the adversarial examples' hash out (see the AutoAttack test)."""
    if same_bytes:
        assert sharded.metrics == whole.metrics
        adv = [r.details["provenance"]["adversarial_sha256"] for r in (sharded, whole)]
        assert adv[0] == adv[1]
    else:
        assert [(m.name, m.n) for m in sharded.metrics] == [(m.name, m.n) for m in whole.metrics]
        assert [m.value for m in sharded.metrics] == pytest.approx(
            [m.value for m in whole.metrics], rel=1e-6
        )
    assert (sharded.clean, sharded.robust, sharded.n) == (whole.clean, whole.robust, whole.n)
    skip = {"provenance", "shards", "ray_node"}
    assert {k: v for k, v in sharded.details.items() if k not in skip} == {
        k: v for k, v in whole.details.items() if k not in skip
    }
    split = sharded.details["shards"]
    assert len(split) == shards == len(sharded.subtasks)
    assert split[0]["start"] == 0 and split[-1]["stop"] == N
    assert all(s["start"] % BATCH == 0 for s in split)
    # Shard 0 runs in the job's own task, on the GPU that task holds to the end; every
    # other shard is a task with a GPU of its own, and shards that ran side by side held
    # different ones. (Two shard tasks one after the other may share one: a cold worker
    # can take longer to start than a shard takes to run.)
    records = sharded.subtasks
    assert all(r.gpu_ids for r in records)
    assert all(r.gpu_ids != records[0].gpu_ids for r in records[1:])
    together = [
        (a, b)
        for i, a in enumerate(records)
        for b in records[i + 1 :]
        if a.started_at < b.finished_at and b.started_at < a.finished_at
    ]
    assert all(a.gpu_ids != b.gpu_ids for a, b in together)
    assert not whole.subtasks and "shards" not in whole.details


@pytest.mark.parametrize(("shard_size", "shards"), [(40, 2), (None, 3)])
def test_pgd_shards_merge_to_the_unsharded_result(
    tmp_path, robust_model, ray_gpus, shard_size, shards
):
    """40 points round up to 48 (3 batches): 2 shards; unset, one per GPU: 3 of 32."""
    model, store = robust_model
    spec = _spec("pgd", {"steps": 10}, shard_size=shard_size)
    whole = _whole(_spec("pgd", {"steps": 10}), model, store, str(tmp_path))
    values = {m.name: m.value for m in whole.metrics}
    clean, robust = values["clean_accuracy"], values["robust_accuracy"]
    assert 0 < robust < clean  # the comparison is about points PGD breaks and points it does not
    sharded = ray_gpus.get(_as_task(ray_gpus, spec, model, store, str(tmp_path), 1))
    _same_result(sharded, whole, shards)
    assert all(s["resumed_from"] == 0 for s in sharded.details["shards"])
    # The shards' checkpoints are gone with the finished job.
    assert not list((tmp_path / "artifacts" / "checkpoints").glob("job-1-shard-*"))


def test_autoattack_shards_merge_with_their_breakdown(tmp_path, robust_model, ray_gpus):
    model, store = robust_model
    params = {"steps": 5, "queries": 20, "n_target_classes": 2}
    whole = _whole(_spec("autoattack", params), model, store, str(tmp_path))
    assert sum(whole.details["breakdown"].values()) > 0
    spec = _spec("autoattack", params, shard_size=32)
    sharded = ray_gpus.get(_as_task(ray_gpus, spec, model, store, str(tmp_path), 2))
    # The breakdown counts too, summed over the shards. Not the same bytes: FAB-T and
    # Square run on the rows a batch still has robust, and on another CPU (a CI run) one
    # adversarial example came out an ulp apart between the Ray worker and this process
    # (mean L2 3e-9 apart) while every outcome and count agreed.
    _same_result(sharded, whole, 3, same_bytes=False)


def _kill_when_checkpointed(store, name: str, title: str, killed: list) -> None:
    """SIGKILL the shard's worker once its checkpoint holds some chunks, not all."""
    path = ArtifactStore(store).named_path(f"checkpoints/{name}.safetensors")
    end = time.time() + 60
    while time.time() < end and not killed:
        if path.exists():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if (proc.info["cmdline"] or [""])[0].startswith(title):
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(proc.info["pid"])
        time.sleep(0.005)


def test_killed_shard_resumes_from_its_checkpoint(tmp_path, robust_model, ray_gpus):
    model, store = robust_model
    # Small chunks and many steps: the second shard takes long enough to be caught.
    params = {"steps": 200}
    whole = _whole({**_spec("pgd", params), "batch_size": 8}, model, store, str(tmp_path))
    spec = {**_spec("pgd", params, shard_size=48), "batch_size": 8}
    killed: list = []
    watcher = threading.Thread(
        target=_kill_when_checkpointed,
        args=(store, "job-3-shard-48-96", "ray::gauntlet-shard-48-96", killed),
    )
    watcher.start()
    sharded = ray_gpus.get(_as_task(ray_gpus, spec, model, store, str(tmp_path), 3))
    watcher.join()
    assert killed, "the shard's worker was never found to kill"
    first, second = sharded.details["shards"]
    assert first["resumed_from"] == 0 and 0 < second["resumed_from"] <= 48
    assert sharded.metrics == whole.metrics
    assert (sharded.clean, sharded.robust) == (whole.clean, whole.robust)
    adv = [r.details["provenance"]["adversarial_sha256"] for r in (sharded, whole)]
    assert adv[0] == adv[1]
    assert sharded.details["grad_evals"] == whole.details["grad_evals"]


def test_shard_size_is_not_in_the_job_key_and_is_checked():
    spec = JobSpec(model_id="m" * 64, dataset="digits", attack="pgd", norm="linf", eps=0.1)
    sharded = JobSpec(**{**spec.__dict__, "shard_size": 64})
    assert sharded.key == spec.key and sharded.evaluation_key == spec.evaluation_key
    with pytest.raises(GauntletError, match="Expected `shard_size` to be a positive int"):
        JobSpec(**{**spec.__dict__, "shard_size": 0}).validate()
    suite = parse_suite(
        {
            "shard_size": 500,
            "eps": {"linf": {"default": 0.1}},
            "evaluations": [
                {"attack": "pgd", "norm": "linf"},
                {"attack": "fgsm", "norm": "linf", "shard_size": 100},
            ],
        },
        "big",
    )
    assert [s.shard_size for s in suite.expand("m" * 64, "digits")] == [500, 100]
    with pytest.raises(GauntletError, match="evaluation 1 .*`shard_size`"):
        parse_suite(
            {"evaluations": [{"attack": "pgd", "norm": "linf", "shard_size": "many"}]}, "bad"
        )


def test_a_shards_permanent_error_fails_the_job_with_its_message(tmp_path, digits_models, ray_gpus):
    """The job's process has the network in its cache; its shards' fresh workers must read
    the store, where the weights are gone: their error is the job's."""
    model, store = stored_model(tmp_path / "artifacts", digits_models["standard"], id="s" * 64)
    sha = model["weights_sha256"]
    whole = {**_spec("fgsm", {}), "model_id": model["id"]}
    _whole(whole, model, str(store), str(tmp_path))  # run whole by the driver: cached
    spec = {**whole, "shard_size": 48}
    ArtifactStore(store).get(sha).unlink()
    with pytest.raises(GauntletError, match=f"artifact {sha[:12]} is missing from the store"):
        _whole(spec, model, str(store), str(tmp_path))
    many = {**spec, "resources": {"num_gpus": 4, "memory_mb": None}}
    with pytest.raises(GauntletError, match="each shard asks for 4 GPUs, but the cluster has 3"):
        _whole(many, model, str(store), str(tmp_path))
