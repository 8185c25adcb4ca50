"""``gauntlet submit``: validate a model, store it, expand its suite, enqueue new jobs.

Submitting is idempotent end to end: the model id is a hash of (weights, architecture,
dataset, input spec), and job keys are hashes of each evaluation, so a second
submission of the same thing inserts no rows and enqueues nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from gauntlet.cluster.artifacts import ArtifactStore
from gauntlet.cluster.settings import Settings
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.enqueue import enqueue_fresh
from gauntlet.scheduler.queue import JobQueue
from gauntlet.scheduler.spec import JobSpec, canonical_json
from gauntlet.scheduler.suites import Suite, load_suite
from gauntlet.workers.datasets import dataset_info
from gauntlet.workers.models import InputSpec


@dataclass
class SubmitReport:
    model_id: str
    name: str
    new_model: bool
    jobs: int
    new_jobs: int
    enqueued: int


def model_key(weights_sha256: str, arch: str, dataset: str, input_spec: InputSpec) -> str:
    identity = {
        "weights": weights_sha256,
        "arch": arch,
        "dataset": dataset,
        "input": input_spec.to_dict(),
    }
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def default_input_spec(dataset: str, **overrides) -> InputSpec:
    """The dataset's shape and conventional normalisation, with the user's overrides."""
    info = dataset_info(dataset)
    values = {
        "channels": info.channels,
        "height": info.height,
        "width": info.width,
        "num_classes": info.num_classes,
        "mean": tuple(info.mean),
        "std": tuple(info.std),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    spec = InputSpec(**values)
    spec.validate()
    return spec


def new_jobs(specs: list[JobSpec], suite: str | None) -> list[lifecycle.NewJob]:
    return [
        lifecycle.NewJob(
            job_key=s.key,
            model_id=s.model_id,
            kind=s.kind,
            suite=suite,
            spec=s.to_dict(),
            dataset=s.dataset,
            attack=s.attack,
            norm=s.norm,
            eps=s.eps,
            subset_key=s.subset_key,
            defense=s.defense_config(),
            source_model_id=s.source_label,
        )
        for s in specs
    ]


def enqueue_new(engine, queue: JobQueue) -> int:
    """XADD every queued job that has no stream entry yet; returns how many we added.

    Covers both fresh rows and rows a crashed submit inserted but never enqueued. Two
    submits (or a submit and a nightly run) racing over the same rows each see them all;
    the compare-and-set in ``enqueue_fresh`` lets exactly one of them XADD each job.
    """
    return len(enqueue_fresh(engine, queue, lifecycle.unenqueued_jobs(engine)))


def expand_suite(
    suite_name: str | Suite, model_id: str, dataset: str, n: int | None = None, engine=None
) -> list[JobSpec]:
    """The suite's jobs for one model; with ``engine``, also its transfer jobs.

    ``suite_name`` is a suite's name or path, or a suite already loaded (a train job's,
    resolved when it was requested). Transfer jobs pair the model with every other model
    of the dataset, both ways: a new model adds a row and a column to the
    transferability matrix, nothing else.
    """
    suite = load_suite(suite_name) if isinstance(suite_name, str) else suite_name
    max_n = dataset_info(dataset).test_size
    specs = suite.expand(model_id, dataset, n=n, max_n=max_n)
    if engine is not None and suite.transfer is not None:
        others = [
            m["id"]
            for m in lifecycle.list_models(engine)
            if m["id"] != model_id and m["dataset"] == dataset
        ]
        for other in others:
            specs += suite.transfer_specs(model_id, other, dataset, n=n, max_n=max_n)
            specs += suite.transfer_specs(other, model_id, dataset, n=n, max_n=max_n)
        if suite.transfer.get("ensemble") and len(others) >= 2:
            specs += suite.transfer_specs(model_id, others, dataset, n=n, max_n=max_n)
    return specs


def submit(
    settings: Settings,
    engine,
    queue: JobQueue,
    weights: str | Path,
    *,
    arch: str,
    dataset: str,
    suite: str,
    name: str | None = None,
    n: int | None = None,
    input_overrides: dict | None = None,
    owner_id: int | None = None,
    card: dict | None = None,
) -> SubmitReport:
    # Every check first (intake: caps, names, dtypes, the suite), so a refused
    # submission stores nothing. Imported here: intake builds on this module.
    from gauntlet.scheduler import intake

    options = {"arch": arch, "dataset": dataset, "suite": suite, "name": name, "n": n}
    options["input_overrides"] = input_overrides
    options["card"] = card
    note = intake.check_submission(settings, weights, options)
    arch = options["arch"]  # an ONNX file's architecture is "onnx", whatever was given
    path = Path(weights)
    input_spec = default_input_spec(dataset, **(input_overrides or {}))

    weights_sha = ArtifactStore(settings.artifacts).put_file(path)
    model_id = model_key(weights_sha, arch, dataset, input_spec)
    specs = expand_suite(suite, model_id, dataset, n, engine=engine)
    display = name or path.stem
    created = lifecycle.upsert_model(
        engine,
        id=model_id,
        name=display,
        arch=arch,
        dataset=dataset,
        input_spec=input_spec.to_dict(),
        weights_sha256=weights_sha,
        owner_id=owner_id,
        # An account's model stays private until published; the CLI's are public.
        public=owner_id is None,
    )
    intake.store_note(engine, model_id, note)
    intake.store_card(engine, model_id, options["card"])
    if settings.gate:  # only the gate now; its verdict queues the rest (scheduler.gate)
        from gauntlet.scheduler import gate

        spec = gate.gate_spec(model_id, dataset, suite, n, options["card"])
        inserted = gate.queue_gate(engine, queue, spec)
    else:
        inserted = lifecycle.insert_jobs(engine, new_jobs(specs, suite))
    enqueued = enqueue_new(engine, queue)
    return SubmitReport(model_id, display, created, len(specs), len(inserted), enqueued)
