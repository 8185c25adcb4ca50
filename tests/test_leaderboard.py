"""The leaderboard's per-example worst case, ranking and intervals, on both backends."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import sqlalchemy as sa

from gauntlet.db import open_database
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.boards.leaderboard import leaderboard
from gauntlet.workers.results import JobResult, pack, wilson_interval
from tests.service_helpers import add_model as add_model_row

N = 10
SUBSET = f"digits:test:{N}:0"


@pytest.fixture
def engine(db_url: str):
    engine = open_database(db_url, auto_upgrade=True)
    yield engine
    engine.dispose()


def add_model(engine: sa.Engine, name: str, dataset: str = "digits") -> str:
    model_id = name.encode().hex().ljust(64, "0")
    add_model_row(engine, model_id, name, dataset=dataset)
    return model_id


def mask(n: int, false_at) -> list[bool]:
    return [i not in set(false_at) for i in range(n)]


def evaluate(
    engine: sa.Engine,
    model_id: str,
    attack: str,
    clean: list[bool],
    robust: list[bool],
    *,
    eps: float | None = 0.1,
    dataset: str = "digits",
    end: str = "done",
    defense: str | None = None,
    details: dict | None = None,
) -> int:
    """A job of ``model_id`` taken to ``end``: done (with outcomes), failed or running."""
    n = len(clean)
    norm = None if attack == "clean" else "linf"
    eps = None if attack == "clean" else eps
    label = f"{model_id}-{attack}-{eps}-{dataset}-{defense}-{details}"
    key = hashlib.sha256(label.encode()).hexdigest()
    (job_id,) = lifecycle.insert_jobs(
        engine,
        [
            lifecycle.NewJob(
                job_key=key,
                model_id=model_id,
                kind="eval",
                suite="test",
                spec={},
                dataset=dataset,
                attack=attack,
                norm=norm,
                eps=eps,
                subset_key=f"{dataset}:test:{n}:0",
                defense=defense,
            )
        ],
    )
    claim = lifecycle.claim(engine, job_id, "sched", 60)
    if end == "done":
        result = JobResult(
            metrics=[], n=n, clean=pack(clean), robust=pack(robust), details=details or {}
        )
        assert lifecycle.finish(engine, job_id, "sched", claim.attempt, result)
    elif end == "failed":
        assert lifecycle.fail(engine, job_id, "sched", claim.attempt, "oom", permanent=True)
    return job_id


def test_robust_accuracy_is_the_per_example_worst_case(engine: sa.Engine) -> None:
    model = add_model(engine, "net")
    clean = mask(N, {9})
    evaluate(engine, model, "clean", clean, clean)
    evaluate(engine, model, "apgd", clean, mask(N, {0, 1, 2, 9}))  # alone: 6/10
    evaluate(engine, model, "square", clean, mask(N, {2, 3, 9}))  # alone: 7/10
    # Not part of this table: another eps, a failed and a still running attack.
    evaluate(engine, model, "apgd", clean, mask(N, range(10)), eps=0.3)
    evaluate(engine, model, "fgsm", clean, mask(N, range(10)), end="failed")
    evaluate(engine, model, "cw", clean, mask(N, range(10)), end="running")

    entries = leaderboard(engine)
    assert [(e.eps, e.rank) for e in entries] == [(0.1, 1), (0.3, 1)]
    entry = entries[0]
    assert (entry.dataset, entry.norm, entry.subset_key) == ("digits", "linf", SUBSET)
    assert (entry.model, entry.model_id, entry.arch, entry.n) == ("net", model, "mlp", 10)
    assert entry.clean_accuracy == 0.9
    assert entry.robust_accuracy == 0.5  # survivors {4, 5, 6, 7, 8}, not min(0.6, 0.7)
    assert (entry.robust_low, entry.robust_high) == wilson_interval(5, 10)
    assert entry.robust_low == pytest.approx(0.2366, abs=1e-4)
    assert entry.attacks == ["apgd", "square"]
    assert entry.strongest_attack == "apgd"
    assert entries[1].robust_accuracy == 0.0 and entries[1].strongest_attack == "apgd"


def test_models_rank_by_robust_then_clean_accuracy(engine: sa.Engine) -> None:
    weak, strong, tied = (
        add_model(engine, "weak"),
        add_model(engine, "strong"),
        add_model(engine, "tied"),
    )
    evaluate(engine, weak, "pgd", mask(N, set()), mask(N, {0, 1, 2, 3, 4, 5}))  # 4/10
    evaluate(engine, strong, "pgd", mask(N, {9}), mask(N, {8, 9}))  # 8/10
    evaluate(engine, tied, "pgd", mask(N, {7, 8, 9}), mask(N, {0, 7, 8, 9}))  # 6/10, clean .7
    evaluate(engine, tied, "clean", mask(N, {7, 8, 9}), mask(N, {7, 8, 9}))
    evaluate(engine, tied, "square", mask(N, {7, 8, 9}), mask(N, {7, 8, 9}))  # breaks nothing

    entries = leaderboard(engine)
    assert [(e.rank, e.model, e.robust_accuracy) for e in entries] == [
        (1, "strong", 0.8),
        (2, "tied", 0.6),
        (3, "weak", 0.4),
    ]
    assert entries[0].strongest_attack == "pgd" and entries[1].attacks == ["pgd", "square"]

    # Same robust accuracy as "tied" (6/10) with higher clean accuracy ranks above it.
    better = add_model(engine, "better")
    evaluate(engine, better, "pgd", mask(N, {9}), mask(N, {0, 1, 2, 9}))
    assert [e.model for e in leaderboard(engine)] == ["strong", "better", "tied", "weak"]


def test_clean_accuracy_comes_from_the_clean_job(engine: sa.Engine) -> None:
    with_clean, without = add_model(engine, "with-clean"), add_model(engine, "without")
    evaluate(engine, with_clean, "clean", mask(N, {8, 9}), mask(N, {8, 9}))
    # This attack job's clean bitset disagrees (a buggy worker): the clean job wins, and
    # a robust bit on a misclassified point does not count as robust.
    evaluate(engine, with_clean, "pgd", mask(N, set()), mask(N, {0}))
    evaluate(engine, without, "pgd", mask(N, {7}), mask(N, {0, 7}))
    by_name = {e.model: e for e in leaderboard(engine)}
    assert by_name["with-clean"].clean_accuracy == 0.8
    assert by_name["with-clean"].robust_accuracy == 0.7
    assert by_name["without"].clean_accuracy == 0.9


def test_groups_need_an_attack_and_the_dataset_filter_applies(engine: sa.Engine) -> None:
    model = add_model(engine, "net")
    evaluate(engine, model, "clean", mask(N, set()), mask(N, set()))
    assert leaderboard(engine) == []  # a clean job alone makes no table
    other = add_model(engine, "cifar-net", dataset="cifar10")
    evaluate(engine, other, "pgd", mask(N, set()), mask(N, {1}), dataset="cifar10")
    evaluate(engine, model, "pgd", mask(N, set()), mask(N, {1, 2}))
    assert [e.dataset for e in leaderboard(engine)] == ["cifar10", "digits"]
    assert [e.model for e in leaderboard(engine, dataset="digits")] == ["net"]


def test_another_attack_never_raises_robust_accuracy(engine: sa.Engine) -> None:
    rng = np.random.default_rng(7)
    n, trials = 40, {}
    for trial in range(6):
        model = add_model(engine, f"m{trial}")
        clean = rng.random(n) < 0.9
        robust = [clean & (rng.random(n) < 0.7) for _ in range(3)]
        evaluate(engine, model, "pgd", list(clean), list(robust[0]))
        evaluate(engine, model, "apgd", list(clean), list(robust[1]))
        trials[f"m{trial}"] = (model, clean, robust)
    before = {e.model: e.robust_accuracy for e in leaderboard(engine)}
    for name, (model, clean, robust) in trials.items():
        assert before[name] == np.count_nonzero(robust[0] & robust[1]) / n
        evaluate(engine, model, "square", list(clean), list(robust[2]))
    after = {e.model: e for e in leaderboard(engine)}
    for name, (_, _, robust) in trials.items():
        survived = robust[0] & robust[1] & robust[2]
        assert after[name].robust_accuracy == np.count_nonzero(survived) / n
        assert after[name].robust_accuracy <= before[name]
        assert after[name].attacks == ["apgd", "pgd", "square"]
    assert any(after[name].robust_accuracy < before[name] for name in trials)
