"""Job specs: one evaluation of one model, and its deterministic job key.

A spec names everything that decides the numbers (model, dataset subset, attack with
its resolved configuration, threat) and, apart from that, how to run it (GPUs,
memory, batch size). The job key hashes only the first part: running the same
evaluation on other hardware is the same job, while changing an attack's defaults
changes its ``repr`` and so its key, which is how nightly runs find what changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from cluster.errors import GauntletError

#: Bumped when the evaluation protocol itself changes (subset drawing, metrics).
EVAL_VERSION = 1


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Resources:
    num_gpus: float = 0.0
    memory_mb: int | None = None

    def __post_init__(self):
        if not isinstance(self.num_gpus, (int, float)) or self.num_gpus < 0:
            raise GauntletError(
                f"Expected `num_gpus` to be a number >= 0, but got {self.num_gpus!r}"
            )
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise GauntletError(
                f"Expected `num_gpus` to be a fraction below 1 or a whole number, "
                f"but got {self.num_gpus!r}"
            )
        if self.memory_mb is not None and (
            not isinstance(self.memory_mb, int) or self.memory_mb <= 0
        ):
            raise GauntletError(
                f"Expected `memory_mb` to be a positive int, but got {self.memory_mb!r}"
            )


@dataclass(frozen=True)
class JobSpec:
    model_id: str
    dataset: str
    attack: str
    params: dict = field(default_factory=dict)
    norm: str | None = None
    eps: float | None = None
    n: int = 200
    seed: int = 0
    kind: str = "eval"
    batch_size: int = 256
    resources: Resources = field(default_factory=Resources)

    @property
    def subset_key(self) -> str:
        return f"{self.dataset}:test:{self.n}:{self.seed}"

    def attack_config(self) -> str:
        """The attack's resolved configuration, defaults included (its stable repr)."""
        from workers.attacks import build_attack

        return repr(build_attack(self.attack, self.params))

    def validate(self) -> None:
        from workers.attacks import Threat, validate_attack

        if not isinstance(self.n, int) or self.n <= 0:
            raise GauntletError(f"Expected `n` to be a positive int, but got {self.n!r}")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise GauntletError(
                f"Expected `batch_size` to be a positive int, but got {self.batch_size!r}"
            )
        threat = None if self.norm is None else Threat(self.norm, float(self.eps))
        validate_attack(self.attack, self.params, threat)

    @property
    def key(self) -> str:
        identity = {
            "v": EVAL_VERSION,
            "kind": self.kind,
            "model": self.model_id,
            "subset": self.subset_key,
            "attack": self.attack_config(),
            "norm": self.norm,
            "eps": None if self.eps is None else round(float(self.eps), 10),
        }
        return hashlib.sha256(canonical_json(identity).encode()).hexdigest()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["subset_key"] = self.subset_key
        return data

    @classmethod
    def from_dict(cls, data: dict) -> JobSpec:
        data = {k: v for k, v in data.items() if k != "subset_key"}
        data["resources"] = Resources(**(data.get("resources") or {}))
        return cls(**data)
