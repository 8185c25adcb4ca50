"""Training-time defenses: ``train`` jobs in, derived models (with lineage) out.

``request_training`` queues a train job for a submitted model. When it finishes, the
dispatcher calls ``register_derived``: the derived weights (already in the artifact
store) become a model row whose ``parent_id`` is the submitted model, and the suite
named in the job is expanded for it, so it is evaluated like any submission.

The suite is read when the job is requested, on the host that requests it, and its
whole definition is stored in the job's spec: by the time the job finishes, on some
scheduler's host, a suite file named by path may not exist there (or may have changed).
"""

from __future__ import annotations

from dataclasses import asdict

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.intake import MAX_NAME
from gauntlet.scheduler.queue import JobQueue
from gauntlet.scheduler.spec import JobSpec
from gauntlet.scheduler.submit import enqueue_new, expand_suite, model_key, new_jobs
from gauntlet.scheduler.suites import Suite, load_suite, parse_suite
from gauntlet.workers.models import InputSpec


def find_model(engine, ref: str) -> dict:
    matches = [
        m for m in lifecycle.list_models(engine) if m["name"] == ref or m["id"].startswith(ref)
    ]
    if len(matches) != 1:
        found = "no model" if not matches else f"{len(matches)} models"
        raise GauntletError(f"{found} match {ref!r}; give a model name or a longer id prefix")
    return matches[0]


def request_job(
    engine,
    queue: JobQueue,
    ref: str,
    kind: str,
    method: str,
    params: dict,
    *,
    n: int = 200,
    num_gpus: float = 0.0,
    suite: str | None = None,
) -> tuple[int, bool]:
    """Queue one ``kind`` job (train, backdoor, pate) for model ``ref``; (id or 0, new?)."""
    from gauntlet.scheduler.spec import Resources

    model = find_model(engine, ref)
    spec = JobSpec(
        model_id=model["id"],
        dataset=model["dataset"],
        attack=method,
        params=dict(params),
        kind=kind,
        n=n,
        resources=Resources(num_gpus=num_gpus),
    )
    spec.validate()
    inserted = lifecycle.insert_jobs(engine, new_jobs([spec], suite))
    enqueue_new(engine, queue)
    return (inserted[0] if inserted else 0), bool(inserted)


def request_training(
    engine, queue: JobQueue, ref: str, method: str, params: dict, **options
) -> tuple[int, bool]:
    """Queue a train job for model ``ref``; its derived model is evaluated with the suite.

    ``options`` are ``request_job``'s: ``n`` and ``num_gpus``. A suite that does not
    load fails the request now, not the job later. The job key leaves the suite out, so
    asking again with the same settings is the same job.
    """
    suite = params.get("suite", "quick")
    if isinstance(suite, dict):  # already resolved (a stored spec passed back in)
        suite = suite["name"]
    resolved = {"name": suite, "definition": asdict(load_suite(suite))}
    params = dict(params, suite=resolved)
    return request_job(engine, queue, ref, "train", method, params, suite=suite, **options)


def job_suite(job: dict) -> Suite:
    """The suite a train job evaluates its derived model with, as it was when requested.

    Jobs queued before suites were stored in the spec name theirs only; those are
    loaded by name.
    """
    stored = ((job.get("spec") or {}).get("params") or {}).get("suite")
    if isinstance(stored, dict) and "definition" in stored:
        definition = stored["definition"]
        return parse_suite(dict(definition), definition.get("name") or stored["name"])
    return load_suite(job["suite"] or "quick")


def register_derived(engine, queue: JobQueue, job_id: int) -> str | None:
    """Register a finished train job's model and enqueue its suite; its id, or None."""
    job = lifecycle.get_job(engine, job_id)
    details = (job or {}).get("details") or {}
    sha = details.get("derived_weights_sha256")
    if job is None or job["kind"] != "train" or not sha:
        return None
    parent = lifecycle.get_model(engine, job["model_id"])
    spec = InputSpec.from_dict(parent["input_spec"])
    derived = model_key(sha, parent["arch"], parent["dataset"], spec)
    suffix = f"+{details['method']}"
    lifecycle.upsert_model(
        engine,
        id=derived,
        # The parent's name may already use the whole bound: shorten it, keep the method.
        name=parent["name"][: MAX_NAME - len(suffix)] + suffix,
        arch=parent["arch"],
        dataset=parent["dataset"],
        input_spec=parent["input_spec"],
        weights_sha256=sha,
        parent_id=parent["id"],
    )
    suite = job["suite"] or "quick"
    n = int(job["subset_key"].split(":")[2])
    specs = expand_suite(job_suite(job), derived, parent["dataset"], n, engine=engine)
    lifecycle.insert_jobs(engine, new_jobs(specs, suite))
    enqueue_new(engine, queue)
    return derived
