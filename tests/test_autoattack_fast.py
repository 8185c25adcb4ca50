"""``autoattack-fast`` against ``autoattack`` on the same points, and ``nightly --fast``.

The fast protocol runs the expensive members only on the points its cheap stage left
close to the boundary; these tests measure it against the full ensemble (robust
accuracy within 0.5 points, a fraction of the gradient passes) on the standard and the
adversarially trained digits CNN, and check that nightly gives a model whose
``autoattack`` results went stale the full protocol and a current one the fast one.
"""

from __future__ import annotations

import pytest

from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.nightly import nightly
from gauntlet.workers.attacks import ATTACKS, Threat, build_attack
from gauntlet.workers.datasets import eval_subset
from gauntlet.workers.defenses import build_defense
from gauntlet.workers.models import InputSpec, load_classifier
from gauntlet.workers.task import run_spec as evaluate
from tests.attack_helpers import seeded
from tests.service_helpers import make_app, pgd_spec, submit_digits

# Cheap settings, the same for both protocols, where only the screen's mechanics are
# tested: 20 steps, 500 Square queries.
CHEAP = {"steps": 20, "queries": 500}


@pytest.fixture(scope="module")
def points():
    x, y, _ = eval_subset("digits", 200, 0, None)
    return x, y


# Both protocols are random (APGD's and Square's draws): a single seed's gap mixes in
# each one's own noise (autoattack's robust count moves by one example of 200 between
# seeds here, the fast protocol's by up to three), so the protocols are compared on
# their mean over four seeds.
SEEDS = range(4)


@pytest.mark.parametrize("name,eps", [("standard", 0.1), ("robust", 0.2)])
def test_fast_is_within_half_a_point_of_autoattack_at_a_fraction_of_its_passes(
    digits_models, points, name, eps
):
    model = load_classifier(digits_models[name], "small-cnn", InputSpec(1, 8, 8, 10)).eval()
    x, y = points
    threat = Threat("linf", eps)
    # Each protocol as shipped (100 steps; Square 5000 and 500 queries): the screen
    # trusts margins after 100 steps of gradient ascent, and 20 steps leave points far
    # by margin that Square still breaks.
    slow_robust, quick_robust = [], []
    for seed in SEEDS:
        full = build_attack("autoattack", {})
        fast = build_attack("autoattack-fast", {})
        slow = full(model, x, y, threat, generator=seeded(seed))
        quick = fast(model, x, y, threat, generator=seeded(seed))
        slow_robust.append(int(slow.robust.sum()))
        quick_robust.append(int(quick.robust.sum()))
        clean = slow.clean_correct.float().mean().item()
        robust = slow.robust.float().mean().item()
        assert 0.1 < robust < clean  # points left to attack, and points broken
        # The expensive stage saw only some of the points the cheap stage left robust.
        left = int(quick.robust.sum()) + fast.breakdown["fab-t"] + fast.breakdown["square"]
        assert 0 <= fast.screened < left
        # Over 20 points were probed, and the gradient members beat the probe on most.
        assert fast.masked == 0
        # Gradient passes (rows x steps) of the white-box members: far fewer.
        assert quick.grad_evals < 0.5 * slow.grad_evals
    # 0.5 points of 200 is one example: count examples, not rounded fractions.
    gap = abs(sum(quick_robust) - sum(slow_robust)) / len(SEEDS)
    assert gap <= 0.005 * len(y), (name, slow_robust, quick_robust)


def test_the_screen_decides_who_meets_the_expensive_members(digits_models, points):
    model = load_classifier(digits_models["robust"], "small-cnn", InputSpec(1, 8, 8, 10)).eval()
    x, y = points[0][:60], points[1][:60]
    threat = Threat("linf", 0.2)
    # Without the probe, whose suspects would join the close points.
    none = build_attack("autoattack-fast", {**CHEAP, "screen": 0.0, "probe_queries": 0})
    every = build_attack("autoattack-fast", {**CHEAP, "screen": 1000.0, "probe_queries": 0})
    cheap = none(model, x, y, threat, generator=seeded(0))
    full = every(model, x, y, threat, generator=seeded(0))
    # Screen 0: nobody is close, FAB-T and Square never run.
    assert none.screened == 0 and none.seconds["fab-t"] == none.seconds["square"] == 0.0
    # A screen above every margin: every point the cheap stage left robust is close.
    assert every.screened == int(cheap.robust.sum()) > 0
    assert full.robust.sum() <= cheap.robust.sum()


def test_the_probe_sees_through_masked_gradients(digits_models, points):
    """Bit-depth reduction without BPDA passes no gradient: the gradient members barely
    move a margin, so the screen alone would call every point far and keep Square off
    them. The probe must find the gradients masked and give the robust points
    ``autoattack``'s full members, so the two protocols agree again."""
    net = load_classifier(digits_models["robust"], "small-cnn", InputSpec(1, 8, 8, 10)).eval()
    model = build_defense("bit-depth", {"bits": 3}, net).eval()
    x, y = points
    threat = Threat("linf", 0.2)
    full = build_attack("autoattack", {})
    fast = build_attack("autoattack-fast", {})
    unprobed = build_attack("autoattack-fast", {"probe_queries": 0})
    slow = full(model, x, y, threat, generator=seeded(0))
    quick = fast(model, x, y, threat, generator=seeded(0))
    blind = unprobed(model, x, y, threat, generator=seeded(0)).robust.sum()
    # Square does the breaking in the full ensemble: gradients are masked here.
    assert full.breakdown["square"] > full.breakdown["apgd-ce"] + full.breakdown["apgd-t"]
    assert fast.masked == 1 and unprobed.masked == 0
    # One seed each (the full members cost autoattack's time here): Square does the
    # breaking, and its draws move autoattack's own count by up to 6 examples of 200
    # between seeds (96, 92, 96, 90 for seeds 0-3), so one seed's gap may be that wide.
    # (Over those four seeds the fast protocol's mean was 0.75 examples away.)
    gap = abs(int(quick.robust.sum()) - int(slow.robust.sum()))
    assert gap <= 0.03 * len(y), (gap, full.breakdown, fast.breakdown)
    # Without the probe the fast protocol overstates robustness by far (the failure
    # the probe exists for): over 10 points here.
    assert blind - slow.robust.sum() > 0.1 * len(y)


def test_an_eval_job_flags_the_batches_the_probe_found_masked_across_a_resume(stored):
    """The job says why it spent ``autoattack``'s budget: a reliability flag. Killed
    after its first batch and resumed, it still counts both batches, and the points
    each member broke, from its checkpoint."""
    model, store = stored
    spec = pgd_spec(
        attack="autoattack-fast",
        params={},
        n=40,
        batch_size=20,
        defense="bit-depth",
        adaptive=False,
    )
    whole = evaluate(spec, model, artifacts=store, data_root="")
    assert "a black-box probe beat the gradient members on most points in 2 batch(es)" in (
        " ".join(whole.details["flags"])
    ), whole.details["flags"]

    def dies_after_one_batch(done, total):
        raise RuntimeError("worker lost")

    resume = {"artifacts": store, "data_root": "", "checkpoint_name": "job-3"}
    with pytest.raises(RuntimeError):
        evaluate(spec, model, progress=dies_after_one_batch, **resume)
    again = evaluate(spec, model, **resume)
    assert again.details["flags"] == whole.details["flags"]
    assert again.details["breakdown"] == whole.details["breakdown"]
    assert sum(whole.details["breakdown"].values()) > 0


def test_nightly_fast_reruns_stale_models_in_full_and_current_ones_fast(
    tmp_path, digits_models, monkeypatch
):
    app = make_app(tmp_path / "home")
    prefix = app.settings.redis_prefix

    def drain():
        assert app.dispatcher(LocalExecutor()).run(drain=True).failed == 0

    old = submit_digits(app, digits_models["standard"], suite="autoattack", name="old", n=20)
    drain()
    # AutoAttack's code changes: the first model's results are stale, the second model
    # is evaluated after the change, so its results are current.
    monkeypatch.setattr(ATTACKS["autoattack"], "version", ATTACKS["autoattack"].version + 1)
    new = submit_digits(app, digits_models["robust"], suite="autoattack", name="new", n=20)
    drain()
    before = {job["id"] for job in lifecycle.list_jobs(app.engine)}

    report = nightly(app.engine, app.queue, app.redis, prefix=prefix, fast=True)
    queued = [job for job in lifecycle.list_jobs(app.engine) if job["id"] not in before]
    got = sorted((job["model_id"] == old.model_id, job["suite"], job["attack"]) for job in queued)
    # (The fast suite's clean evaluation is the full suite's, done already.)
    assert got == [
        (False, "autoattack-fast", "autoattack-fast"),
        (True, "autoattack", "autoattack"),
    ], got
    assert report.stale == 1 and report.suites == {"autoattack": 1, "autoattack-fast": 1}
    assert new.model_id != old.model_id
    # Without --fast the current model gets nothing and the stale one its full re-run.
    plain = nightly(app.engine, app.queue, app.redis, prefix=prefix)
    assert plain.new_jobs == 0  # the stale re-run is queued already


def test_bad_fast_settings_are_one_clear_error():
    from gauntlet.cluster.errors import GauntletError

    with pytest.raises(GauntletError, match="`screen`"):
        build_attack("autoattack-fast", {"screen": -1.0})
    with pytest.raises(GauntletError, match="`cheap_targets`"):
        build_attack("autoattack-fast", {"cheap_targets": 0})
    with pytest.raises(GauntletError, match="`fab_targets`"):
        build_attack("autoattack-fast", {"fab_targets": 0})
    with pytest.raises(GauntletError, match="`masked_share`"):
        build_attack("autoattack-fast", {"masked_share": 1.5})
    # Every target in the cheap stage: the expensive stage has no APGD-T left to run.
    every = build_attack("autoattack-fast", {"cheap_targets": 9})
    assert [m.name for m in every.expensive] == ["fab-t", "square"]
