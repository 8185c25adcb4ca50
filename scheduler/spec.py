"""Job specs: one evaluation of one model, and its deterministic job key.

A spec names everything that decides the numbers (model, dataset subset, attack with
its resolved configuration, threat) and, apart from that, how to run it (GPUs,
memory, batch size, time limit). The job key hashes only the first part: running the
same evaluation on other hardware, or with more time, is the same job, while changing
an attack's defaults changes its ``repr`` and so its key, and so does bumping the
version of an attack, defense or job kind it runs (``scheduler.versions``): that is how
nightly runs find what changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler.versions import bumped, spec_versions

#: Bumped when the evaluation protocol itself changes (subset drawing, metrics); code
#: changes of one attack, defense or job kind bump that one's ``version`` instead.
EVAL_VERSION = 1

# Seeds enter the subset key (a 200-character column) and numpy's generators, which take
# 32-bit seeds; a bound keeps both honest.
MAX_SEED = 2**32 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _settings_checker(kind: str):
    """For kinds whose ``attack`` names a procedure: its validator (settings with defaults).

    Job kinds are plug-ins (``gauntlet.workers.jobs``): each declares its own check, so
    this module never lists them.
    """
    from gauntlet.workers.jobs import job_kind

    return job_kind(kind).check


def check_timeout(value: Any, where: str = "") -> None:
    """``timeout_s`` is None or a positive, finite number of seconds."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is not None and not (ok and 0 < value < float("inf")):
        prefix = f"{where}: " if where else ""
        raise GauntletError(
            f"{prefix}Expected `timeout_s` to be a positive number of seconds, but got {value!r}"
        )


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _hash(identity: dict) -> str:
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


@dataclass(frozen=True)
class Resources:
    num_gpus: float = 0.0
    memory_mb: int | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str = "resources") -> Resources:
        """``resources`` from a suite or a stored spec; unknown keys are named, not a TypeError."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise GauntletError(
                f"{where}: Expected `resources` to be a mapping with `num_gpus` and "
                f"`memory_mb`, but got {data!r}"
            )
        unknown = sorted(map(str, set(data) - {"num_gpus", "memory_mb"}))
        if unknown:
            raise GauntletError(
                f"{where}: unknown `resources` key(s) {', '.join(unknown)}; "
                "known: memory_mb, num_gpus"
            )
        try:
            return cls(**data)
        except GauntletError as exc:
            raise GauntletError(f"{where}: {exc}") from None

    def __post_init__(self):
        ok = isinstance(self.num_gpus, (int, float)) and not isinstance(self.num_gpus, bool)
        if not ok or not 0 <= self.num_gpus < float("inf"):
            raise GauntletError(
                f"Expected `num_gpus` to be a number >= 0, but got {self.num_gpus!r}"
            )
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise GauntletError(
                f"Expected `num_gpus` to be a fraction below 1 or a whole number, "
                f"but got {self.num_gpus!r}"
            )
        if self.memory_mb is not None and (not _is_int(self.memory_mb) or self.memory_mb <= 0):
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
    # A defense wrapped around the model at evaluation time, and whether attacks adapt
    # to it (BPDA through non-differentiable parts, EOT over randomness).
    defense: str | None = None
    defense_params: dict = field(default_factory=dict)
    adaptive: bool = True
    eot_samples: int = 10
    # Fresh draws of a randomized defense an adversarial input must survive (draws.py).
    draws: int = 10
    # Robustness curve: robust accuracy at each of these budgets, in one job.
    eps_sweep: list = field(default_factory=list)
    # Transfer: craft on this (surrogate) model, score on ``model_id``; or craft on an
    # ensemble of surrogates (their mean logits, Liu et al. 2017).
    source_model: str | None = None
    source_ensemble: list = field(default_factory=list)
    # Seconds the job may run (None: its kind's default); how to run it, not what it
    # computes, so it stays out of the job key like ``resources``.
    timeout_s: float | None = None
    # Points per shard (``workers.shards``; None: chosen from the points and the GPUs).
    # How the job runs, not what it computes: out of the job key too.
    shard_size: int | None = None

    @property
    def subset_key(self) -> str:
        return f"{self.dataset}:test:{self.n}:{self.seed}"

    def attack_config(self) -> str:
        """The attack's resolved configuration, defaults included (its stable repr)."""
        from gauntlet.workers.attacks import build_attack

        check = _settings_checker(self.kind)
        if check is not None:
            return f"{self.kind}:{self.attack}:{canonical_json(check(self.attack, self.params))}"
        return repr(build_attack(self.attack, self.params))

    def defense_config(self) -> str | None:
        if self.defense is None:
            return None
        from gauntlet.workers.defenses import build_defense

        return repr(build_defense(self.defense, self.defense_params, None))

    @property
    def source_label(self) -> str | None:
        """What the jobs table records as the transfer source."""
        if self.source_ensemble:
            return f"ensemble:{len(self.source_ensemble)}"
        return self.source_model

    def validate(self) -> None:
        from gauntlet.workers.attacks import Threat, validate_attack
        from gauntlet.workers.jobs import kind_names

        if self.kind not in kind_names():
            raise GauntletError(
                f"Expected `kind` to be one of {', '.join(kind_names())}, but got {self.kind!r}"
            )
        if not _is_int(self.n) or self.n <= 0:
            raise GauntletError(f"Expected `n` to be a positive int, but got {self.n!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise GauntletError(
                f"Expected `seed` to be an integer in [0, {MAX_SEED}], but got {self.seed!r}"
            )
        if not _is_int(self.batch_size) or self.batch_size <= 0:
            raise GauntletError(
                f"Expected `batch_size` to be a positive int, but got {self.batch_size!r}"
            )
        if not isinstance(self.attack, str):
            raise GauntletError(f"Expected `attack` to be a name, but got {self.attack!r}")
        if not isinstance(self.params, dict):
            raise GauntletError(f"Expected `params` to be a mapping, but got {self.params!r}")
        check_timeout(self.timeout_s)
        if self.shard_size is not None and (not _is_int(self.shard_size) or self.shard_size <= 0):
            raise GauntletError(
                f"Expected `shard_size` to be a positive int, but got {self.shard_size!r}"
            )
        check = _settings_checker(self.kind)
        if check is not None:
            check(self.attack, self.params)
            return
        if self.norm is not None and not isinstance(self.norm, str):
            raise GauntletError(f"Expected `norm` to be a name, but got {self.norm!r}")
        if self.eps_sweep and self.norm is None:
            raise GauntletError("`eps_sweep` needs a `norm`: it multiplies that norm's budget")
        if not isinstance(self.adaptive, bool):
            raise GauntletError(
                f"Expected `adaptive` to be true or false, but got {self.adaptive!r}"
            )
        threat = None if self.norm is None else Threat(self.norm, float(self.eps))
        validate_attack(self.attack, self.params, threat)
        for eps in self.eps_sweep:
            validate_attack(self.attack, self.params, Threat(self.norm, float(eps)))
        if self.defense is not None:
            from gauntlet.workers.defenses import validate_defense

            validate_defense(self.defense, self.defense_params)
        if not _is_int(self.draws) or not 1 <= self.draws <= 1000:
            raise GauntletError(
                f"Expected `draws` to be an integer in [1, 1000], but got {self.draws!r}"
            )
        if not _is_int(self.eot_samples) or not 1 <= self.eot_samples <= 1000:
            raise GauntletError(
                "Expected `eot_samples` to be an integer in [1, 1000], "
                f"but got {self.eot_samples!r}"
            )

    def work(self) -> int:
        """A job's size: points x steps x restarts x EOT samples x budgets.

        Only attack jobs have it (training kinds are bounded by their own checks). Steps
        and restarts are the attack's resolved settings, so defaults count too; EOT
        multiplies only behind a defense, and a robustness curve runs every budget.
        """
        if _settings_checker(self.kind) is not None:
            return self.n
        from gauntlet.workers.attacks import build_attack

        attack = build_attack(self.attack, self.params)
        steps = getattr(attack, "steps", 1) or 1
        restarts = getattr(attack, "restarts", 1) or 1
        eot = self.eot_samples if self.defense is not None else 1
        return self.n * steps * restarts * eot * (1 + len(self.eps_sweep))

    def check_work(self, limit: int) -> None:
        work = self.work()
        if work > limit:
            raise GauntletError(
                f"evaluation {self.attack!r} ({self.kind}) asks for {work:,} units of work "
                "(points x steps x restarts x EOT samples x budgets), above the cap of "
                f"{limit:,} per job (GAUNTLET_MAX_JOB_WORK); lower `n`, `steps`, `restarts` "
                "or `eot_samples`"
            )

    def versions(self) -> dict:
        """The versions of the code this job runs (``scheduler.versions``)."""
        return spec_versions(self)

    @property
    def key(self) -> str:
        """The job key: the evaluation and the versions of the code that computes it.

        Versions enter only once one of them is above 1. Every version started at 1, so
        every job stored before versions existed keeps its key and is not run again; from
        then on a bump changes the keys of exactly the jobs that run the bumped code.
        """
        versions = self.versions()
        if not bumped(versions):
            return self.evaluation_key
        return _hash(self._identity() | {"versions": versions})

    @property
    def evaluation_key(self) -> str:
        """The key without versions: one evaluation, whichever code version ran it."""
        return _hash(self._identity())

    def _identity(self) -> dict:
        # Only what decides the numbers: resources, batch and shard sizes, timeout_s stay out.
        identity = {
            "v": EVAL_VERSION,
            "kind": self.kind,
            "model": self.model_id,
            "subset": self.subset_key,
            "attack": self.attack_config(),
            "norm": self.norm,
            "eps": None if self.eps is None else round(float(self.eps), 10),
        }
        # Added fields enter the key only when set, so jobs that predate them keep theirs.
        if self.defense is not None:
            identity["defense"] = self.defense_config()
            identity["adaptive"] = self.adaptive
            identity["eot"] = self.eot_samples
            if self.draws != 10:  # the default predates the field: old keys keep theirs
                identity["draws"] = self.draws
        if self.eps_sweep:
            identity["sweep"] = [round(float(e), 10) for e in self.eps_sweep]
        if self.source_model is not None:
            identity["source"] = self.source_model
        if self.source_ensemble:
            identity["sources"] = sorted(self.source_ensemble)
        return identity

    def to_dict(self) -> dict:
        """The stored spec: the fields, the subset key and the versions it runs with,
        which later tell whether its result is stale (``scheduler.staleness``)."""
        data = asdict(self)
        data["subset_key"] = self.subset_key
        data["versions"] = self.versions()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> JobSpec:
        data = {k: v for k, v in data.items() if k not in ("subset_key", "versions")}
        data["resources"] = Resources.from_dict(data.get("resources"))
        return cls(**data)
