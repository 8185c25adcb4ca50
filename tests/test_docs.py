"""The README stays honest: every command, setting and registered name appears in it."""

from __future__ import annotations

from pathlib import Path

import click

from gauntlet.cluster.settings import ENVIRONMENT
from gauntlet.scheduler.cli import main
from gauntlet.scheduler.suites import suite_names
from gauntlet.workers.architectures import ARCHITECTURES, architecture_names
from gauntlet.workers.attacks import ATTACKS
from gauntlet.workers.datasets import dataset_names
from gauntlet.workers.defenses import DEFENSES
from gauntlet.workers.jobs import kind_names

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _commands(group: click.Group, prefix: str = "gauntlet") -> list[str]:
    names = []
    for name, command in group.commands.items():
        names.append(f"{prefix} {name}")
        if isinstance(command, click.Group):
            names.extend(_commands(command, f"{prefix} {name}"))
    return names


def test_every_command_is_documented():
    missing = [c for c in _commands(main) if f"`{c}" not in README]
    assert not missing, f"README lacks {missing}"


def test_every_setting_is_documented():
    assert not [v for v in ENVIRONMENT if f"`{v}`" not in README]


def test_every_registered_name_is_documented():
    # Built-ins only: tests register attacks of their own through the same registry.
    ours = "gauntlet.workers."
    builtin = [n for n, cls in ATTACKS.items() if cls.__module__.startswith(ours)]
    defenses = [n for n, cls in DEFENSES.items() if cls.__module__.startswith(ours)]
    assert "pgd" in builtin and "jpeg" in defenses  # the filter itself must find the built-ins
    archs = [n for n in architecture_names() if ARCHITECTURES.get(n).__module__.startswith(ours)]
    names = [*builtin, *defenses, *suite_names(), *archs, *dataset_names()]
    names += kind_names()
    missing = [n for n in names if f"`{n}`" not in README]
    assert not missing, f"README lacks {missing}"


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README
