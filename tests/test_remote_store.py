"""Artifacts through Ray: workers whose GAUNTLET_ARTIFACTS is an empty directory of their own.

A real local Ray whose workers see another artifact root than the scheduler's (set in
the job-wide runtime environment). The scheduler's executor serves its store through the
artifact actor; nothing may reach the workers through the scheduler's path.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file, save

from gauntlet.cluster.artifact_actor import CHUNK
from gauntlet.cluster.artifacts import ArtifactStore, sha256_file
from gauntlet.cluster.errors import GauntletError
from gauntlet.cluster.settings import Settings
from gauntlet.scheduler.executors import RayExecutor
from gauntlet.workers import results
from gauntlet.workers.datasets import load_split
from gauntlet.workers.defenses.quilting import patch_database
from gauntlet.workers.results import JobFailure, JobResult
from tests.conftest import stored_model
from tests.service_helpers import pgd_spec


@pytest.fixture(scope="module")
def worker_root(tmp_path_factory):
    return tmp_path_factory.mktemp("worker-home") / "artifacts"


@pytest.fixture(scope="module")
def ray_elsewhere(worker_root):
    """A local Ray whose workers' home and artifact root are theirs, not the scheduler's."""
    import ray

    env = {"GAUNTLET_HOME": str(worker_root.parent), "GAUNTLET_ARTIFACTS": str(worker_root)}
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def scheduler_store(tmp_path, digits_models):
    model, root = stored_model(tmp_path / "scheduler-artifacts", digits_models["standard"])
    return Path(root), model


def _payload(root, model, job_id: int, spec: dict) -> dict:
    return {"artifacts": str(root), "data_root": "", "job_id": job_id, "spec": spec, "model": model}


def _wait(executor, handle, timeout=120.0):
    assert executor.ready([handle], timeout=timeout) == [handle], "the job did not finish"
    return executor.outcome(handle)


def _files(root) -> set[str]:
    return (
        {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
        if root.exists()
        else set()
    )


@pytest.mark.ray
def test_weights_results_and_defense_state_travel_through_ray(
    ray_elsewhere, scheduler_store, worker_root
):
    root, model = scheduler_store
    executor = RayExecutor(transport="ray")
    spec = pgd_spec(n=96, attack="fgsm", params={}, defense="quilting")
    spec["defense_params"] = {"database_size": 800}
    outcome = _wait(executor, executor.submit(1, _payload(root, model, 1, spec), 0, None))
    assert isinstance(outcome, JobResult), outcome

    # The worker's own root holds the weights it downloaded, checked, and nothing else.
    weights = model["weights_sha256"]
    assert _files(worker_root) == {f"{weights[:2]}/{weights}"}
    assert sha256_file(worker_root / weights[:2] / weights) == weights

    # The adversarial examples it kept landed in the scheduler's store, hash intact.
    kept = outcome.details["provenance"]["adversarial_sha256"]
    x_adv = load_file(str(ArtifactStore(root).get(kept)))["x_adv"]
    assert x_adv.shape == (96, 1, 8, 8)

    # The fitted quilting database: in the scheduler's store, equal to a fit made here.
    state = outcome.details["defense_state"]
    database = load_file(str(ArtifactStore(root).get(state)))["database"]
    assert torch.equal(database, patch_database(load_split("digits", "train", None)[0], 3, 800, 0))
    refs = [name for name in _files(root) if name.startswith("defense-state/")]
    assert len(refs) == 1 and (root / refs[0]).read_text() == state

    # A second job with that defense loads the state through the actor instead of refitting.
    again = _wait(executor, executor.submit(2, _payload(root, model, 2, spec), 0, None))
    assert again.details["defense_state"] == state
    assert (again.clean, again.robust) == (outcome.clean, outcome.robust)
    assert outcome.details["ray_node"] == ray_elsewhere.get_runtime_context().get_node_id()


@pytest.mark.ray
def test_a_checkpoint_written_by_one_attempt_is_read_by_the_next(
    ray_elsewhere, scheduler_store, worker_root
):
    root, model = scheduler_store
    n, chunk = 384, 64
    spec = pgd_spec(n=n, batch_size=chunk, params={"steps": 300})
    payload = _payload(root, model, 7, spec)
    executor = RayExecutor(transport="ray")
    first = executor.submit(7, payload, 0, None)
    saved = root / "checkpoints" / "job-7.safetensors"
    deadline = time.monotonic() + 120
    while not saved.exists():  # the first chunk's checkpoint, written through the actor
        assert time.monotonic() < deadline, "no checkpoint appeared in the scheduler's store"
        time.sleep(0.02)
    executor.cancel(first)  # kills the worker process mid-job, as a lost node would
    assert isinstance(_wait(executor, first), JobFailure)

    state = load(saved.read_bytes())
    done = int(state["done"])
    assert 0 < done < n, done
    # Mark what the first attempt found in a way no recomputation would: every clean
    # point it attacked counts as robust. The next attempt must carry these over.
    flipped = int((state["clean"][:done] & ~state["robust"][:done]).sum())
    assert flipped > 0, "PGD broke nothing in the first chunks; the check would be empty"
    state["robust"][:done] = state["clean"][:done]
    ArtifactStore(root).put_named("checkpoints/job-7.safetensors", save(state))

    second = _wait(executor, executor.submit(7, payload, 0, None))
    assert isinstance(second, JobResult), second
    robust = results.unpack(second.robust, n)
    clean = results.unpack(second.clean, n)
    assert (robust[:done] == state["clean"][:done].numpy()).all()
    assert (robust <= clean).all()
    assert not saved.exists()  # cleared once the job finished
    assert not (worker_root / "checkpoints").exists()  # never on the worker's disk


def _round_trip(address: str, sha: str, data: bytes) -> tuple[str, str]:
    """On a worker: fetch ``sha`` and upload ``data``; the local copy's hash, the upload's."""
    from gauntlet.workers.remote_store import open_store

    store = open_store(address)
    return sha256_file(store.get(sha)), store.put_bytes(data)


@pytest.mark.ray
def test_large_artifacts_cross_in_chunks_and_corruption_is_caught(
    ray_elsewhere, scheduler_store, worker_root, digits_models
):
    root, model = scheduler_store
    executor = RayExecutor(transport="ray")
    address = executor._artifacts_address(str(root))
    big = torch.Generator().manual_seed(0)
    down = torch.randint(0, 256, (2 * CHUNK + 123,), dtype=torch.uint8, generator=big).numpy()
    up = torch.randint(0, 256, (CHUNK + 7,), dtype=torch.uint8, generator=big).numpy()
    sha = ArtifactStore(root).put_bytes(down.tobytes())
    task = ray_elsewhere.remote(_round_trip)
    got, sent = ray_elsewhere.get(task.remote(address, sha, up.tobytes()))
    assert got == sha and (worker_root / sha[:2] / sha).stat().st_size == 2 * CHUNK + 123
    assert sent == sha256_file(ArtifactStore(root).get(sent))
    assert (root / sent[:2] / sent).read_bytes() == up.tobytes()

    # Weights changed on the scheduler's disk fail the job with the hash mismatch, and
    # nothing of them is cached on the worker.
    other = ArtifactStore(root).put_file(digits_models["robust"])
    (root / other[:2] / other).write_bytes(b"not the submitted weights")
    payload = _payload(root, {**model, "weights_sha256": other}, 3, pgd_spec(n=8))
    failure = _wait(executor, executor.submit(3, payload, 0, None))
    assert isinstance(failure, JobFailure) and failure.permanent
    assert f"artifact {other[:12]} is corrupt" in failure.message
    assert not (worker_root / other[:2] / other).exists()


def test_bad_transport_and_blob_names_are_one_clear_error(tmp_path):
    with pytest.raises(GauntletError, match="GAUNTLET_ARTIFACT_TRANSPORT.*auto, ray, shared"):
        Settings.from_env({"GAUNTLET_HOME": str(tmp_path), "GAUNTLET_ARTIFACT_TRANSPORT": "nfs"})
    env = {"GAUNTLET_HOME": str(tmp_path), "GAUNTLET_RAY_ADDRESS": "10.0.0.1:6380"}
    assert Settings.from_env(env).artifact_transport_resolved == "ray"
    env["GAUNTLET_ARTIFACT_TRANSPORT"] = "shared"
    assert Settings.from_env(env).artifact_transport_resolved == "shared"
    assert Settings.from_env({"GAUNTLET_HOME": str(tmp_path)}).artifact_transport_resolved == (
        "shared"
    )
    store = ArtifactStore(tmp_path / "store")
    for name in ("../escape", "checkpoints/../../x", "other/job-1"):
        with pytest.raises(GauntletError, match="blob name"):
            store.put_named(name, b"x")
    store.put_named("checkpoints/job-1.safetensors", b"x")
    assert store.get_named("checkpoints/job-1.safetensors") == b"x"
