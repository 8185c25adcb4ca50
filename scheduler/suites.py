"""Suites: named lists of evaluations, shipped as YAML inside the package.

A suite is dataset-agnostic: each threat's budget comes from an ``eps`` table keyed by
dataset (with a ``default``), since 0.3 is the customary Linf budget on MNIST and 8/255
on CIFAR-10. ``expand`` turns a suite into validated job specs for one model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler import suite_fields as fields
from gauntlet.scheduler.spec import JobSpec, Resources

_FIELDS = {
    "name",
    "description",
    "n",
    "seed",
    "eps",
    "resources",
    "batch_size",
    "shard_size",
    "evaluations",
    "defenses",
    "transfer",
}
_number = fields.number


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    n: int
    seed: int
    eps: dict
    resources: dict
    batch_size: int
    evaluations: list
    # Each evaluation runs once per entry: None is the bare model, a mapping
    # {name, params} a defense around it.
    defenses: list = field(default_factory=lambda: [None])
    # Transfer attacks between every pair of models of a dataset: {attack, norm, params}.
    transfer: dict | None = None
    # Points per shard of every evaluation that sets none itself (``workers.shards``).
    shard_size: int | None = None

    def budget(self, norm: str, dataset: str, override: Any = None) -> float:
        if override is not None:
            return _number(override, f"{self.name}: eps")
        table = self.eps.get(norm)
        if not table:
            raise GauntletError(f"suite {self.name!r} gives no `eps` for norm {norm!r}")
        value = table.get(dataset, table.get("default"))
        if value is None:
            raise GauntletError(
                f"suite {self.name!r} gives no {norm} `eps` for dataset {dataset!r}"
            )
        return _number(value, f"{self.name}: eps.{norm}.{dataset}")

    def expand(
        self, model_id: str, dataset: str, *, n: int | None = None, max_n: int | None = None
    ) -> list[JobSpec]:
        """Job specs for one model; ``n`` is capped by ``max_n`` (the test split's size)."""
        size = int(n if n is not None else self.n)
        if max_n is not None:
            size = min(size, max_n)
        specs = []
        for defense in self.defenses:
            for position, item in enumerate(self.evaluations, 1):
                where = fields.evaluation_label(self.name, position, item)
                specs.extend(self._checked(where, item, defense, model_id, dataset, size))
        return specs

    def _checked(self, where: str, item: dict, defense, *args) -> list[JobSpec]:
        """``_specs``, validated, with any message prefixed by the evaluation it is about."""
        try:
            specs = self._specs(item, defense, *args)
            for spec in specs:
                spec.validate()
        except GauntletError as exc:
            raise GauntletError(f"{where}: {exc}") from None
        return specs

    def transfer_specs(
        self,
        target: str,
        source: str | list[str],
        dataset: str,
        *,
        n: int | None = None,
        max_n: int | None = None,
    ) -> list[JobSpec]:
        """Examples crafted on ``source`` (a surrogate), scored on ``target``."""
        if self.transfer is None:
            return []
        size = min(int(n if n is not None else self.n), max_n or 10**9)
        item = {k: v for k, v in self.transfer.items() if k != "ensemble"}
        where = f"suite {self.name!r}, transfer"
        (spec,) = self._checked(where, item, None, target, dataset, size)
        if isinstance(source, list):
            return [replace(spec, source_ensemble=sorted(source))]
        return [replace(spec, source_model=source)]

    def _specs(self, item: dict, defense, model_id: str, dataset: str, size: int):
        norm = item.get("norm")
        eps = None if norm is None else self.budget(norm, dataset, item.get("eps"))
        # eps_sweep lists multiples of the budget, capped where the norm allows no more
        # (Linf 1: every image), so one sweep serves every dataset.
        cap = 1.0 if norm == "linf" else float("inf")
        sweep = [min(cap, eps * float(m)) for m in item.get("eps_sweep") or []]
        common = dict(
            model_id=model_id,
            dataset=dataset,
            attack=item["attack"],
            params=dict(item.get("params") or {}),
            norm=norm,
            eps=eps,
            n=size,
            seed=self.seed,
            batch_size=self.batch_size,
            resources=Resources.from_dict(self.resources, f"suite {self.name!r}"),
            eps_sweep=sorted(set(sweep)),
            kind=item.get("kind", "eval"),
            timeout_s=item.get("timeout_s"),  # checked by suite_fields; not in the job key
            shard_size=item.get("shard_size", self.shard_size),  # nor is this
        )
        if defense is None:
            return [JobSpec(**common)]
        name, params = defense["name"], dict(defense.get("params") or {})
        eot = item.get("eot_samples", 10)  # ints: suite_fields checked them
        draws = item.get("draws", 10)
        modes = [True]
        if item.get("adaptive") is None and item["attack"] != "clean":
            # Both numbers for a defended entry: a defense that only masks gradients
            # looks robust to the plain attack and not to the adaptive one.
            modes = [True, False]
        elif item.get("adaptive") is not None:
            modes = [bool(item["adaptive"])]
        return [
            JobSpec(
                **common,
                defense=name,
                defense_params=params,
                adaptive=mode,
                eot_samples=eot,
                draws=draws,
            )
            for mode in modes
        ]


def suite_names() -> list[str]:
    folder = resources.files("gauntlet.scheduler") / "suites"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def parse_suite(data: dict, name: str) -> Suite:
    if not isinstance(data, dict):
        raise GauntletError(f"suite {name!r} must be a YAML mapping")
    unknown = set(data) - _FIELDS
    if unknown:
        raise GauntletError(
            f"suite {name!r} has unknown fields {sorted(map(str, unknown))}; "
            f"known: {sorted(_FIELDS)}"
        )
    header = fields.suite_header(data, name)
    # Checked here, not first at expansion, so that a bad section fails before any work.
    Resources.from_dict(header["resources"], f"suite {name!r}")
    return Suite(
        **header,
        evaluations=fields.evaluations(data.get("evaluations"), name),
        defenses=fields.defenses(data.get("defenses"), name),
        transfer=fields.transfer(data.get("transfer"), name),
    )


def load_suite(name: str) -> Suite:
    """A shipped suite by name, or a suite of the user's own from a ``.yaml`` path."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            missing = "is not a file" if path.exists() else "does not exist"
            raise GauntletError(f"suite file {name!r} {missing}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise GauntletError(f"cannot read suite file {name!r}: {exc}") from None
        except yaml.YAMLError as exc:
            # PyYAML's messages span lines (with a caret under the spot); one line here.
            raise GauntletError(
                f"suite file {name!r} is not valid YAML: {' '.join(str(exc).split())}"
            ) from None
        except RecursionError:  # the composer recurses once per nesting level
            raise GauntletError(f"suite file {name!r} nests too deeply to be a suite") from None
        return parse_suite(data, path.stem)
    known = suite_names()
    if name not in known:
        raise GauntletError(f"unknown suite {name!r}; known suites: {', '.join(known)}")
    text = (resources.files("gauntlet.scheduler") / "suites" / f"{name}.yaml").read_text()
    return parse_suite(yaml.safe_load(text), name)
