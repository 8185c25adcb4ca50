"""Terminal output fits an 80-column terminal, help names real commands, suites agree."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import click
import pytest
from rich.console import Console

from gauntlet.scheduler.boards.calibration import COLUMNS, CalibrationRow
from gauntlet.scheduler.boards.leaderboard import Entry
from gauntlet.scheduler.boards.tracks import TrackRow
from gauntlet.scheduler.boards.transfer import Cell
from gauntlet.scheduler.cli import main, tables
from gauntlet.scheduler.cli.interop import model_tables
from gauntlet.scheduler.suites import load_suite, suite_names

NAME = "wide-resnet-28-10-adversarially-trained"


def _render(table, width: int = 80) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(tables.fit(table, width))
    return console.export_text()


def _entry(rank: int, defense: str | None = None) -> Entry:
    return Entry(
        rank=rank, model_id="a" * 64, model=f"{NAME}-{rank}", arch="wrn-28-10",
        dataset="cifar10", norm="linf", eps=8 / 255, subset_key="n1000-seed0",
        clean_accuracy=0.9123, robust_accuracy=0.5678, n=1000, robust_low=0.5371,
        robust_high=0.5981, attacks=["apgd-ce", "apgd-t", "fgsm", "square"],
        strongest_attack="apgd-ce", defense=defense, robust_non_adaptive=0.8771,
        unreliable=["a black-box attack beats every white-box one"] if rank == 2 else [],
    )  # fmt: skip


def _metrics(prefix: str = "") -> dict:
    return {f"{prefix}{c}": 0.1234 + i / 100 for i, c in enumerate(COLUMNS)}


def _corruption_metrics() -> dict:
    names = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "contrast"]
    m = {"clean_accuracy": 0.9123, "mean_corruption_accuracy": 0.7654, "mean_corruption_ece": 0.05}
    for i, name in enumerate(names):
        m[f"acc@{name}"], m[f"ece@{name}"] = 0.8111 - i / 100, 0.0421
    return m


def _cases():
    calibration = [
        CalibrationRow(
            "a" * 64, f"{NAME}-{i}", "jpeg(quality=75)", "cifar10", "s", 1000, _metrics()
        )
        for i in range(2)
    ]
    corruption = [
        CalibrationRow("a" * 64, f"{NAME}-{i}", None, "cifar10", "s", 1000, _corruption_metrics())
        for i in range(4)
    ]
    cells = [
        Cell("cifar10", "linf", 8 / 255, s, f"{NAME}-{s}", t, f"{NAME}-{t}", 0.4321, 1000,
             0.4, 0.46)
        for s in "abcd" for t in "abcd" if s != t
    ]  # fmt: skip
    backdoor = [
        TrackRow(1, "a" * 64, NAME, "digits", "transfer",
                 {"trigger": "square", "mode": "all-to-one", "poison_rate": 0.1, "task": "split",
                  "freeze": True, "amplify": 4},
                 450, {"backdoored_clean_accuracy": 0.9712,
                       "backdoored_attack_success_rate": 0.9911,
                       "clean_accuracy": 0.9634, "attack_success_rate": 0.1234})
    ]  # fmt: skip
    privacy = [
        TrackRow(2, "a" * 64, NAME, "digits", "confident-gnmax",
                 {"teachers": 250, "backdoored_teachers": 1},
                 450, {"answered": 0.8123, "eps": 4.6931, "eps_data_independent": 12.3456,
                       "delta": 1e-5, "student_accuracy": 0.9312,
                       "student_attack_success_rate": 0.0412})
    ]  # fmt: skip
    jobs = [
        {"id": 12345, "model": NAME, "dataset": "fashion-mnist", "attack": "apgd-dlr",
         "norm": "linf", "eps": 8 / 255, "status": "failed", "attempts": 3,
         "device": "cuda:0 (ray gpu 0)", "error": "gave up after 3 failures: " + "x" * 70}
    ]  # fmt: skip
    report = {
        "model": {"id": "a" * 64, "name": NAME, "arch": "wrn-28-10", "dataset": "cifar10",
                  "created_at": datetime.now(timezone.utc).isoformat()},
        "card": {"authors": "A. Author, B. Author", "link": "https://arxiv.org/abs/2010.03593",
                 "reported": 65.87},
        "jobs": [{"id": 7, "kind": "eval", "attack": "autoattack", "norm": "linf",
                  "eps": 8 / 255, "defense": None, "status": "done", "error": None,
                  "metrics": {"robust_accuracy": {"value": 0.5678, "n": 1000,
                                                  "ci_low": 0.5371, "ci_high": 0.5981}}}],
    }  # fmt: skip
    return {
        "leaderboard": (tables.leaderboard_tables([_entry(1, "jpeg(quality=75)"), _entry(2)]),
                        ["91.2%", "56.8%", "53.7%-59.8%", "87.7%", "1000"]),
        "calibration": ([tables.calibration_table(calibration)], ["0.123", "0.213"]),
        "corruption": ([tables.corruption_table(corruption)], ["91.2%", "76.5%", "77.1% (0.042)"]),
        "transfer": (tables.transfer_tables(cells), ["43.2%"]),
        "backdoor": ([tables.backdoor_table(backdoor)], ["97.1%", "99.1%", "96.3%", "12.3%"]),
        "privacy": ([tables.privacy_table(privacy)], ["81.2%", "4.693", "12.346", "93.1%", "4.1%"]),
        "jobs": ([tables.jobs_table(jobs)], ["12345", "0.03137", "cuda:0"]),
        "model": (model_tables(report), ["0.5678", "0.537", "65.87"]),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(_cases()))
def test_every_table_shows_its_numbers_at_80_columns(name):
    rendered_tables, numbers = _cases()[name]
    text = "".join(_render(t) for t in rendered_tables)
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80
    flat = re.sub(r"\s+", "", text)
    missing = [n for n in numbers if re.sub(r"\s+", "", n) not in flat]
    assert not missing, f"{name} lacks {missing}:\n{text}"


def test_a_table_that_fits_keeps_its_layout():
    table = tables.jobs_table([])
    assert tables.fit(table, 200) is table


def _commands(group: click.Group, prefix: str = "gauntlet") -> dict[str, click.Command]:
    found = {}
    for name, command in group.commands.items():
        found[f"{prefix} {name}"] = command
        if isinstance(command, click.Group):
            found.update(_commands(command, f"{prefix} {name}"))
    return found


def _help_texts() -> list[str]:
    texts = []
    for command in _commands(main).values():
        texts.append(command.help or "")
        texts += [p.help or "" for p in command.params if isinstance(p, click.Option)]
    return texts


def test_help_names_only_real_commands():
    known = set(_commands(main))
    mentioned = {m for text in _help_texts() for m in re.findall(r"`(gauntlet [a-z -]+)`", text)}
    assert mentioned, "the help texts should point to at least one command"
    # `gauntlet list archs`: a real command with its argument.
    unknown = [m for m in mentioned if not any(m == k or m.startswith(k + " ") for k in known)]
    assert not unknown, unknown
    assert "gauntlet list archs" in mentioned


@pytest.mark.parametrize("name", suite_names())
def test_every_shipped_suite_gives_digits_28_the_budget_of_digits(name):
    suite = load_suite(name)
    for norm in suite.eps:
        digits, upsampled = suite.budget(norm, "digits"), suite.budget(norm, "digits-28")
        # Linf is per pixel: upsampling keeps it. L2 grows with the side: 28/8 times.
        scale = 28 / 8 if norm == "l2" else 1
        assert upsampled == pytest.approx(digits * scale), (name, norm)
