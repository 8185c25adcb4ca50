"""Suites: named lists of evaluations, shipped as YAML inside the package.

A suite is dataset-agnostic: each threat's budget comes from an ``eps`` table keyed by
dataset (with a ``default``), since 0.3 is the customary Linf budget on MNIST and 8/255
on CIFAR-10. ``expand`` turns a suite into validated job specs for one model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler.spec import JobSpec, Resources

_FIELDS = {
    "name",
    "description",
    "n",
    "seed",
    "eps",
    "resources",
    "batch_size",
    "evaluations",
    "defenses",
    "transfer",
}
_EVAL_FIELDS = {
    "attack",
    "norm",
    "eps",
    "params",
    "eps_sweep",
    "eot_samples",
    "adaptive",
    "kind",
}


def _number(value: Any, what: str) -> float:
    """Accept 0.1, "0.1" or "8/255" (how papers write Linf budgets)."""
    try:
        return float(Fraction(str(value).replace(" ", "")))
    except (ValueError, ZeroDivisionError):
        raise GauntletError(
            f"Expected `{what}` to be a number such as 0.1 or 8/255, but got {value!r}"
        ) from None


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
            for item in self.evaluations:
                specs.extend(self._specs(item, defense, model_id, dataset, size))
        for spec in specs:
            spec.validate()
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
        (spec,) = self._specs(item, None, target, dataset, size)
        if isinstance(source, list):
            spec = replace(spec, source_ensemble=sorted(source))
        else:
            spec = replace(spec, source_model=source)
        spec.validate()
        return [spec]

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
            resources=Resources(**self.resources),
            eps_sweep=sorted(set(sweep)),
            kind=item.get("kind", "eval"),
        )
        if defense is None:
            return [JobSpec(**common)]
        name, params = defense["name"], dict(defense.get("params") or {})
        eot = int(item.get("eot_samples", 10))
        modes = [True]
        if item.get("adaptive") is None and item["attack"] != "clean":
            # Both numbers for a defended entry: a defense that only masks gradients
            # looks robust to the plain attack and not to the adaptive one.
            modes = [True, False]
        elif item.get("adaptive") is not None:
            modes = [bool(item["adaptive"])]
        return [
            JobSpec(**common, defense=name, defense_params=params, adaptive=mode, eot_samples=eot)
            for mode in modes
        ]


def suite_names() -> list[str]:
    folder = resources.files("scheduler") / "suites"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def parse_suite(data: dict, name: str) -> Suite:
    if not isinstance(data, dict):
        raise GauntletError(f"suite {name!r} must be a YAML mapping")
    unknown = set(data) - _FIELDS
    if unknown:
        raise GauntletError(
            f"suite {name!r} has unknown fields {sorted(unknown)}; known: {sorted(_FIELDS)}"
        )
    evaluations = data.get("evaluations") or []
    if not evaluations:
        raise GauntletError(f"suite {name!r} lists no evaluations")
    for item in evaluations:
        if not isinstance(item, dict) or "attack" not in item or set(item) - _EVAL_FIELDS:
            raise GauntletError(
                f"suite {name!r}: each evaluation is a mapping with `attack` and optionally "
                f"{sorted(_EVAL_FIELDS - {'attack'})}, but got {item!r}"
            )
    return Suite(
        name=data.get("name", name),
        description=data.get("description", ""),
        n=int(data.get("n", 200)),
        seed=int(data.get("seed", 0)),
        eps=data.get("eps") or {},
        resources=data.get("resources") or {},
        batch_size=int(data.get("batch_size", 256)),
        evaluations=evaluations,
        defenses=_defenses(data.get("defenses"), name),
        transfer=_transfer(data.get("transfer"), name),
    )


def _transfer(item, suite: str) -> dict | None:
    if item is None:
        return None
    if not isinstance(item, dict) or "attack" not in item or "norm" not in item:
        raise GauntletError(
            f"suite {suite!r}: `transfer` is a mapping with `attack`, `norm` and optional "
            f"`params`, but got {item!r}"
        )
    return item


def _defenses(items, suite: str) -> list:
    if items is None:
        return [None]
    parsed = []
    for item in items:
        if item is None or (isinstance(item, dict) and "name" in item):
            parsed.append(item)
        else:
            raise GauntletError(
                f"suite {suite!r}: each of `defenses` is null (no defense) or a mapping with "
                f"`name` and optional `params`, but got {item!r}"
            )
    return parsed


def load_suite(name: str) -> Suite:
    """A shipped suite by name, or a suite of the user's own from a ``.yaml`` path."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise GauntletError(f"suite file {name!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise GauntletError(f"suite file {name!r} is not valid YAML: {exc}") from None
        return parse_suite(data, path.stem)
    known = suite_names()
    if name not in known:
        raise GauntletError(f"unknown suite {name!r}; known suites: {', '.join(known)}")
    text = (resources.files("scheduler") / "suites" / f"{name}.yaml").read_text()
    return parse_suite(yaml.safe_load(text), name)
