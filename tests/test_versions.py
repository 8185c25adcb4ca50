"""Versions: every attack, defense and job kind declares one; job keys include those a
job depends on; a bump marks old results stale and ``gauntlet nightly`` re-runs them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from rich.console import Console

from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.boards.leaderboard import leaderboard
from gauntlet.scheduler.cli import tables
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.nightly import nightly
from gauntlet.scheduler.spec import JobSpec
from gauntlet.scheduler.submit import expand_suite
from gauntlet.scheduler.versions import changes
from gauntlet.workers.attacks import ATTACKS, Attack
from gauntlet.workers.defenses import DEFENSES, Defense
from gauntlet.workers.jobs import JOB_KINDS, JobKind, job_kind, kind_names
from tests.api_helpers import client
from tests.service_helpers import make_app, submit_digits

MODEL = "m" * 64
COMMON = dict(model_id=MODEL, dataset="digits", norm="linf", eps=0.1)


def test_every_attack_defense_and_kind_declares_a_version_one_by_default():
    assert Attack.version == Defense.version == JobKind.version == 1
    declared = [ATTACKS[name].version for name in ATTACKS]
    declared += [DEFENSES[name].version for name in DEFENSES]
    declared += [job_kind(name).version for name in kind_names()]
    assert all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in declared)


def test_a_composite_depends_on_its_members_and_a_procedure_on_its_kind():
    spec = JobSpec(**COMMON, attack="autoattack", defense="jpeg")
    # The members of standard AutoAttack (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T, Square.
    assert spec.versions() == {
        "kind": 1,
        "attack": {"autoattack": 2, "apgd-ce": 2, "apgd-t": 2, "fab-t": 1, "square": 2},
        "defense": {"jpeg": 1},
    }
    # AutoAttack's hyperparameter `version` ("standard") does not hide the code's version.
    assert spec.attack_config().startswith("AutoAttack(version='standard'")
    # A training method is the train kind's own code; explain's `pgd` is the pgd attack.
    train = JobSpec(model_id=MODEL, dataset="digits", attack="pgd-at", kind="train")
    assert train.versions() == {"kind": 1, "attack": {}}
    explain = JobSpec(model_id=MODEL, dataset="digits", attack="pgd", kind="explain")
    assert explain.versions() == {"kind": 1, "attack": {"pgd": 1}}


def test_keys_stay_until_a_version_the_job_runs_is_bumped(monkeypatch):
    fgsm = JobSpec(**COMMON, attack="fgsm")
    # Pinned (as in test_timeouts): keys written before versions existed do not change.
    assert fgsm.key == fgsm.evaluation_key
    assert fgsm.key == "521b01eda4054dd0c32f94e96de3efd1bfb02c1f57c3d785562edea86687117a"
    specs = expand_suite("autoattack", MODEL, "digits", n=20)
    before = {s.evaluation_key: s.key for s in specs}
    assert len(before) == len(specs) > 3

    # An attack no spec of the suite runs: no key changes.
    monkeypatch.setattr(ATTACKS["deepfool"], "version", 2)
    assert {s.evaluation_key: s.key for s in specs} == before
    # A subclass's own bump leaves its parent alone; the parent's reaches the subclass.
    pgd = JobSpec(**COMMON, attack="pgd")
    pgd_key = pgd.key
    monkeypatch.setattr(ATTACKS["fgsm"], "version", 2)
    assert pgd.key == pgd_key and fgsm.key != fgsm.evaluation_key
    monkeypatch.delattr(ATTACKS["fgsm"], "version")
    monkeypatch.setattr(ATTACKS["pgd"], "version", 2)
    assert fgsm.versions()["attack"] == {"fgsm": 2} and pgd.key != pgd_key
    monkeypatch.undo()
    assert fgsm.key == fgsm.evaluation_key and pgd.key == pgd_key

    # A member of autoattack: exactly the specs that run it change, and to distinct keys.
    current = ATTACKS["apgd-t"].version
    monkeypatch.setattr(ATTACKS["apgd-t"], "version", current + 1)
    changed = {s.attack for s in specs if s.key != before[s.evaluation_key]}
    assert changed == {"autoattack"}
    monkeypatch.setattr(ATTACKS["apgd-t"], "version", current)
    assert {s.evaluation_key: s.key for s in specs} == before

    # A defense: only the evaluations behind it.
    defended = JobSpec(**COMMON, attack="fgsm", defense="jpeg")
    key = defended.key
    monkeypatch.setattr(DEFENSES["jpeg"], "version", 3)
    assert defended.key != key and fgsm.key == fgsm.evaluation_key
    assert defended.to_dict()["versions"]["defense"] == {"jpeg": 3}

    # A job kind: every job of it, none of the others.
    calibration = JobSpec(**COMMON, attack="pgd", kind="calibration")
    key = calibration.key
    eval_kind = job_kind("eval")
    monkeypatch.setitem(JOB_KINDS._entries, "eval", dataclasses.replace(eval_kind, version=2))
    assert fgsm.key != "521b01eda4054dd0c32f94e96de3efd1bfb02c1f57c3d785562edea86687117a"
    assert calibration.key == key


def test_jobs_stored_before_versions_ran_version_one_of_everything():
    current = {"kind": 1, "attack": {"pgd": 2}, "defense": {"jpeg": 1}}
    assert changes(None, current) == ["attack pgd v1 -> v2"]
    assert changes({"kind": 1, "attack": {"pgd": 2}}, current) == []
    assert changes({"kind": 2, "attack": {"pgd": 2}}, current) == ["job kind v2 -> v1"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small CNN trained briefly on digits: enough to have points to attack."""
    from gauntlet.scheduler.submit import default_input_spec
    from gauntlet.workers.datasets import load_split
    from gauntlet.workers.models import save_classifier
    from gauntlet.workers.training import train_classifier

    folder = tmp_path_factory.mktemp("weights")
    x, y = load_split("digits", "train", folder)
    torch.manual_seed(0)
    net = train_classifier(x, y, arch="small-cnn", spec=default_input_spec("digits"), epochs=6)
    save_classifier(net, folder / "m.safetensors")
    return folder / "m.safetensors"


def _drain(app) -> None:
    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    assert stats.failed == 0


def test_a_bumped_attack_marks_results_stale_until_nightly_reruns_them(
    tmp_path, weights, monkeypatch
):
    app = make_app(tmp_path / "home")
    prefix = app.settings.redis_prefix
    submit_digits(app, weights, suite="quick", name="m", n=30)  # clean, fgsm, pgd, calibration
    _drain(app)
    (entry,) = leaderboard(app.engine, dataset="digits")
    assert entry.stale == [] and entry.attacks == ["fgsm", "pgd"]
    assert 0 < entry.robust_accuracy < entry.clean_accuracy  # PGD and FGSM broke some points
    first = {job["id"]: job for job in lifecycle.list_jobs(app.engine)}
    assert lifecycle.get_job(app.engine, min(first))["spec"]["versions"] == {
        "kind": 1,
        "attack": {"clean": 1},
    }

    # FGSM is PGD with one step (a subclass): it runs PGD's code and shares its version.
    monkeypatch.setattr(ATTACKS["pgd"], "version", 2)
    (stale,) = leaderboard(app.engine, dataset="digits")
    # Marked, not dropped: the same numbers until a fresh run replaces them.
    assert stale.stale == ["attack fgsm v1 -> v2", "attack pgd v1 -> v2"]
    assert dataclasses.replace(stale, stale=[]) == entry
    # The CLI table and the web page say so (the API's JSON is the entry's fields).
    console = Console(width=200, record=True, color_system=None)
    for table in tables.leaderboard_tables([stale]):
        console.print(table)
    text = console.export_text()
    assert "stale (attack fgsm v1 -> v2; attack pgd v1 -> v2); yes" in text
    http = client(app)
    (row,) = http.get("/api/leaderboard", params={"dataset": "digits"}).json()
    assert row["stale"] == stale.stale and row["robust_accuracy"] == entry.robust_accuracy
    page = http.get("/leaderboard/digits/linf").text
    assert "stale: attack fgsm v1 -&gt; v2; attack pgd v1 -&gt; v2" in page

    report = nightly(app.engine, app.queue, app.redis, prefix=prefix)
    # Exactly the three jobs that run PGD's code re-queued; the clean one is current.
    assert (report.new_jobs, report.stale, report.enqueued) == (3, 3, 3)
    new = [job for job in lifecycle.list_jobs(app.engine) if job["id"] not in first]
    assert sorted((job["kind"], job["attack"]) for job in new) == [
        ("calibration", "pgd"),
        ("eval", "fgsm"),
        ("eval", "pgd"),
    ]
    for job in new:
        stored = lifecycle.get_job(app.engine, job["id"])["spec"]["versions"]
        assert stored["attack"] == {job["attack"]: 2}
    _drain(app)

    (fresh,) = leaderboard(app.engine, dataset="digits")
    assert fresh.stale == [] and "stale" not in http.get("/leaderboard/digits/linf").text
    # The fresh run replaced the stale one; the code is the same, so are the numbers.
    assert fresh == entry
    again = nightly(app.engine, app.queue, app.redis, prefix=prefix)
    assert (again.new_jobs, again.stale) == (0, 0)
