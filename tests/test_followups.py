"""Flags lead to action: follow-ups of a masked evaluation are queued, run, and shown."""

from __future__ import annotations

import sqlalchemy as sa

from gauntlet.db.schema import MetricRow
from gauntlet.scheduler import followups, lifecycle
from gauntlet.scheduler.boards.leaderboard import leaderboard
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.submit import submit
from tests.service_helpers import make_app


def _submit(app, weights, suite: str, name: str):
    return submit(
        app.settings,
        app.engine,
        app.queue,
        weights,
        arch="small-cnn",
        dataset="digits",
        suite=suite,
        name=name,
    )


def _one_suite(tmp_path, weights, suite: str):
    """An app that queues follow-ups, with one model submitted under ``suite`` (YAML)."""
    app = make_app(tmp_path / "home", GAUNTLET_FOLLOWUPS=1)
    path = tmp_path / "suite.yaml"
    path.write_text(suite)
    _submit(app, weights, str(path), "model")
    return app


def _robust(engine, job_id: int) -> float:
    stmt = sa.select(MetricRow.value).where(
        MetricRow.job_id == job_id, MetricRow.name == "robust_accuracy"
    )
    with engine.connect() as conn:
        return conn.execute(stmt).scalar_one()


def _status(job) -> str:
    return str(getattr(job["status"], "value", job["status"]))


def test_masked_defense_gets_follow_ups_and_reads_under_evaluation(tmp_path, digits_models, stack):
    app = make_app(tmp_path / "home", **stack, GAUNTLET_FOLLOWUPS=1)
    surrogate = tmp_path / "surrogate.yaml"
    surrogate.write_text("n: 30\nevaluations:\n  - attack: clean\n")
    # Bit-depth reduction attacked straight through its rounding: zero input gradients.
    masked = tmp_path / "masked.yaml"
    masked.write_text(
        "n: 30\neps: {linf: {default: 0.2}}\n"
        "defenses: [{name: bit-depth, params: {bits: 2}}]\nevaluations:\n"
        "  - attack: clean\n"
        "  - {attack: pgd, norm: linf, adaptive: false, params: {steps: 10}}\n"
        "  - {attack: square, norm: linf, adaptive: false, params: {queries: 50}}\n"
    )
    _submit(app, digits_models["robust"], str(surrogate), "surrogate")
    target = _submit(app, digits_models["standard"], str(masked), "target").model_id

    # One job at a time, stopping once the suite's Square is in: the "before" picture.
    def square_done() -> bool:
        done = lifecycle.list_jobs(app.engine, status="done", limit=None)
        return any(j["attack"] == "square" for j in done)

    app.dispatcher(LocalExecutor(), max_in_flight=1).run(drain=True, should_stop=square_done)
    (entry,) = [e for e in leaderboard(app.engine) if e.model_id == target]
    assert entry.under_evaluation and followups.pending(app.engine)
    assert any("gradients are zero" in flag for flag in entry.unreliable)
    (square,) = lifecycle.list_jobs(app.engine, status="done", where=sa.text("attack='square'"))
    square = lifecycle.get_job(app.engine, square["id"])
    # Square (black-box) beat the only white-box attack, the masked PGD.
    # Its own zero-gradient flag calls for nothing: Square takes no gradients.
    assert followups.triggers(app.engine, square) == ["black-box"]

    app.dispatcher(LocalExecutor()).run(drain=True)
    jobs = lifecycle.list_jobs(app.engine, limit=None)
    assert {_status(j) for j in jobs} == {"done"}
    extra = [j for j in jobs if j["suite"] == followups.FOLLOWUP]
    assert all(j["model_id"] == target for j in extra)
    why = {lifecycle.get_job(app.engine, j["id"])["details"]["followup"]["why"] for j in extra}
    assert any("BPDA" in w for w in why)
    assert any("transfer from surrogate" in w for w in why)
    assert any("Square, a larger query budget" in w for w in why)
    # Each follow-up once; none of them spawned follow-ups of its own.
    keys = [j["job_key"] for j in jobs]
    assert len(keys) == len(set(keys))
    parents = {lifecycle.get_job(app.engine, j["id"])["details"]["followup"]["of"] for j in extra}
    assert not parents & {j["id"] for j in extra}
    squares = [lifecycle.get_job(app.engine, j["id"]) for j in extra if j["attack"] == "square"]
    assert 200 in {s["spec"]["params"]["queries"] for s in squares}  # 4 x the suite's 50

    # BPDA breaks what the plain PGD through the rounding could not.
    by_kind = {}
    for job in jobs:
        spec = lifecycle.get_job(app.engine, job["id"])["spec"]
        if job["attack"] == "pgd" and not spec.get("source_model"):
            by_kind["bpda" if spec["adaptive"] else "plain"] = _robust(app.engine, job["id"])
    assert by_kind["bpda"] < by_kind["plain"] - 0.2

    (entry,) = [e for e in leaderboard(app.engine) if e.model_id == target]
    assert not entry.under_evaluation
    assert entry.robust_accuracy <= by_kind["bpda"]
    # With BPDA in, a black-box attack no longer beats every white-box one.
    assert followups.triggers(app.engine, square) == []
    # A rerun of the flagged jobs' hook queues nothing new: follow-ups are keyed.
    first = min(j["id"] for j in jobs if j["attack"] == "pgd" and j["model_id"] == target)
    assert followups.schedule(app.engine, app.queue, lifecycle.get_job(app.engine, first)) == []


def test_randomized_defense_gets_an_eot_follow_up(tmp_path, digits_models):
    app = _one_suite(
        tmp_path,
        digits_models["standard"],
        "n: 20\neps: {linf: {default: 0.2}}\n"
        "defenses: [{name: gaussian-noise}]\nevaluations:\n"
        "  - {attack: pgd, norm: linf, adaptive: false, eot_samples: 5, params: {steps: 5}}\n",
    )
    app.dispatcher(LocalExecutor()).run(drain=True)
    jobs = [lifecycle.get_job(app.engine, j["id"]) for j in lifecycle.list_jobs(app.engine)]
    (plain,) = [j for j in jobs if j["suite"] != followups.FOLLOWUP]
    assert any("randomized output" in flag for flag in plain["details"]["flags"])
    (eot,) = [j for j in jobs if j["suite"] == followups.FOLLOWUP]
    assert _status(eot) == "done" and eot["spec"]["eot_samples"] == 20  # 4 x 5
    assert eot["details"]["followup"] == {
        "of": plain["id"],
        "why": "randomized output: EOT over 20 samples",
    }
    assert "eot-20" in eot["details"]["adaptations"]


def test_the_fast_protocols_probe_flag_queues_the_masking_follow_ups(tmp_path, digits_models):
    """autoattack-fast behind bit-depth rounding, run non-adaptively: its probe finds the
    gradients masked, and that flag, like a zero gradient, queues BPDA and a larger
    Square, each saying what showed the masking."""
    app = _one_suite(
        tmp_path,
        digits_models["robust"],
        "n: 40\neps: {linf: {default: 0.2}}\n"
        "defenses: [{name: bit-depth, params: {bits: 3}}]\nevaluations:\n"
        "  - {attack: autoattack-fast, norm: linf, adaptive: false}\n",
    )

    def fast_done() -> bool:
        done = lifecycle.list_jobs(app.engine, status="done", limit=None)
        return any(j["attack"] == "autoattack-fast" for j in done)

    app.dispatcher(LocalExecutor(), max_in_flight=1).run(drain=True, should_stop=fast_done)
    (done,) = lifecycle.list_jobs(app.engine, status="done", where=sa.text("suite != 'followup'"))
    job = lifecycle.get_job(app.engine, done["id"])
    assert any("a black-box probe beat" in flag for flag in job["details"]["flags"])
    assert followups.triggers(app.engine, job) == ["masked", "probe"]
    queued = [
        lifecycle.get_job(app.engine, j["id"])
        for j in lifecycle.list_jobs(app.engine, limit=None)
        if j["suite"] == followups.FOLLOWUP
    ]
    got = {(j["attack"], j["spec"]["adaptive"]): j["details"]["followup"]["why"] for j in queued}
    both = "gradients are zero or NaN, and a black-box probe beat the gradient members"
    assert got == {
        ("autoattack-fast", True): f"{both}: BPDA through the defense",
        ("square", False): f"{both}: Square, a larger query budget",
    }
    # The probe's flag alone (gradients that are not zero but useless) plans the same.
    alone = {
        (spec.attack, spec.adaptive): why
        for spec, why in followups.plan(app.engine, job, ["probe"])
    }
    probe = "a black-box probe beat the gradient members"
    assert alone == {key: why.replace(both, probe) for key, why in got.items()}
