"""The dispatcher gathers small jobs into shared transactions, but never holds a free
slot longer than its linger."""

from __future__ import annotations

from datetime import timedelta

from gauntlet.scheduler import bulk, lifecycle
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.spec import JobSpec
from gauntlet.scheduler.submit import enqueue_new, new_jobs
from tests.queue_helpers import register_sleeper, status
from tests.service_helpers import make_app, submit_digits

register_sleeper("test-slow-400ms", 0.4)


def _queue(app, model_id: str, count: int, attack: str = "clean") -> list[int]:
    # Distinct seeds make distinct jobs; 10 points each.
    specs = [
        JobSpec(model_id=model_id, dataset="digits", attack=attack, n=10, seed=seed)
        for seed in range(1000, 1000 + count)
    ]
    ids = lifecycle.insert_jobs(app.engine, new_jobs(specs, None))
    enqueue_new(app.engine, app.queue)
    return ids


def _empty_model(tmp_path, app, digits_models) -> str:
    suite = tmp_path / "none.yaml"
    suite.write_text("n: 10\nevaluations:\n  - attack: clean\n")
    return submit_digits(app, digits_models["standard"], suite=str(suite)).model_id


def test_small_jobs_share_claims_and_result_writes(tmp_path, digits_models, stack, monkeypatch):
    app = make_app(tmp_path / "home", **stack, GAUNTLET_GATE=0, GAUNTLET_FOLLOWUPS=0)
    model_id = _empty_model(tmp_path, app, digits_models)
    ids = _queue(app, model_id, 48)
    calls = {"claim": [], "finish": []}
    claim_many, finish_many = bulk.claim_many, bulk.finish_many

    def counting_claim(engine, job_ids, *args, **kwargs):
        calls["claim"].append(len(job_ids))
        return claim_many(engine, job_ids, *args, **kwargs)

    def counting_finish(engine, owner, results, *args, **kwargs):
        calls["finish"].append(len(results))
        return finish_many(engine, owner, results, *args, **kwargs)

    monkeypatch.setattr(bulk, "claim_many", counting_claim)
    monkeypatch.setattr(bulk, "finish_many", counting_finish)
    dispatcher = app.dispatcher(LocalExecutor(), max_in_flight=16)
    assert dispatcher.batch == 4
    stats = dispatcher.run(drain=True)
    jobs = {job["id"]: job for job in lifecycle.list_jobs(app.engine)}
    assert stats.done == 49 and all(status(jobs[i]) == "done" for i in ids)
    # One transaction per job would make 49 of each; batches make them at least twice
    # as few (refills wait for a quarter of the slots; finished jobs linger for company).
    # (49: the suite's own job and the 48 queued here.)
    assert sum(calls["claim"]) == 49 and len(calls["claim"]) <= 24
    assert sum(calls["finish"]) == 49 and len(calls["finish"]) <= 24


def test_a_free_slot_waits_no_longer_than_the_linger(tmp_path, digits_models, stack):
    app = make_app(tmp_path / "home", **stack, GAUNTLET_GATE=0, GAUNTLET_FOLLOWUPS=0)
    model_id = _empty_model(tmp_path, app, digits_models)
    ids = _queue(app, model_id, 9, attack="test-slow-400ms")
    # Eight slots, batches of two: when the first job ends, one slot is free and the
    # next job ends 0.4 s later. The ninth job must not wait for it.
    dispatcher = app.dispatcher(LocalExecutor(), max_in_flight=8)
    assert dispatcher.batch == 2 and dispatcher.linger_s == 0.02
    dispatcher.run(drain=True)
    jobs = sorted(
        (lifecycle.get_job(app.engine, i) for i in ids), key=lambda job: job["started_at"]
    )
    first_done = min(job["finished_at"] for job in jobs[:-1])
    last = jobs[-1]
    assert last["started_at"] > first_done  # it did wait for a slot
    assert last["started_at"] - first_done < timedelta(seconds=0.2)
