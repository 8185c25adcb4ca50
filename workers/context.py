"""JobContext: everything one job works with, built once by the task entry.

A job kind's runner receives the context and takes what it needs from it: the
submitted network, the defended model, the evaluation subset and the training split
(loaded once, on the job's device), other models the job names (transfer surrogates,
static models of ensemble adversarial training), the artifact store, a checkpoint and a
progress reporter. So a job's data flows down from here instead of each kind loading
its model, data and device its own way.
"""

from __future__ import annotations

import functools
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import metadata

import torch

from gauntlet.cluster.artifacts import ArtifactStore
from gauntlet.cluster.errors import GauntletError
from gauntlet.workers import gpu, model_cache, results
from gauntlet.workers.checkpoint import Checkpoint
from gauntlet.workers.datasets import dataset_info, eval_subset, load_split
from gauntlet.workers.models import InputSpec, load_classifier
from gauntlet.workers.remote_store import RemoteArtifactStore, open_store
from gauntlet.workers.results import JobResult, Metric

Progress = Callable[[int, int], None]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    # Cached: reading package metadata parses files, milliseconds that a small job notices.
    try:
        return metadata.version("gauntlet-eval")
    except metadata.PackageNotFoundError:
        return "unknown"


def pick_device() -> torch.device:
    # Under Ray, CUDA_VISIBLE_DEVICES already narrows this to the GPUs the task was given.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_input_matches(spec: InputSpec, dataset: str) -> None:
    info = dataset_info(dataset)
    model_shape = (spec.channels, spec.height, spec.width)
    data_shape = (info.channels, info.height, info.width)
    if model_shape != data_shape:
        raise GauntletError(
            f"shape mismatch: the model takes inputs of shape {model_shape} but {dataset!r} "
            f"images have shape {data_shape}; submit with a matching input spec"
        )
    if spec.num_classes != info.num_classes:
        raise GauntletError(
            f"shape mismatch: the model has {spec.num_classes} classes but {dataset!r} has "
            f"{info.num_classes}"
        )


@dataclass
class JobContext:
    spec: dict
    model: dict
    artifacts: str
    data_root: str
    progress: Progress | None = None
    device_label: str | None = None
    # Rows of the other models the job's kind asked for, by id.
    others: dict = field(default_factory=dict)
    checkpoint_name: str | None = None
    device: torch.device = field(default_factory=pick_device)
    started: float = field(default_factory=time.perf_counter)
    # Which fitted defense state (an artifact) the job used, if any.
    defense_state: str | None = None
    # The adversarial examples an eval job made: the task entry hashes (and keeps) them.
    adversarial: torch.Tensor | None = None

    # -- settings ---------------------------------------------------------------------

    @property
    def dataset(self) -> str:
        return self.spec["dataset"]

    @property
    def seed(self) -> int:
        return int(self.spec["seed"])

    @cached_property
    def batch_size(self) -> int:
        """The spec's batch size; on a GPU, as many points as fit (``workers.gpu``)."""
        floor = int(self.spec.get("batch_size", 256))
        if self.device.type != "cuda":
            return floor
        spec = self.input_spec
        randomized = bool(self.spec.get("defense")) and getattr(self.defended, "randomized", False)
        return gpu.auto_batch_size(
            self.net,
            (spec.channels, spec.height, spec.width),
            self.device,
            floor=floor,
            cap=max(int(self.spec.get("n") or floor), floor),
            copies=int(self.spec.get("eot_samples", 10)) if randomized else 1,
        )

    @property
    def params(self) -> dict:
        return self.spec.get("params") or {}

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.model["input_spec"])

    @cached_property
    def store(self) -> ArtifactStore | RemoteArtifactStore:
        # A local (or shared) path, or the scheduler's store through Ray (``artifacts``
        # is then a ``ray-artifacts://`` address): the same interface either way.
        return open_store(self.artifacts)

    @cached_property
    def checkpoint(self) -> Checkpoint | None:
        return Checkpoint(self.store, self.checkpoint_name) if self.checkpoint_name else None

    # -- models -----------------------------------------------------------------------

    def load_model(self, row: dict) -> torch.nn.Module:
        """A stored model in pixel space (normalisation inside), checked against the data."""
        input_spec = InputSpec.from_dict(row["input_spec"])
        check_input_matches(input_spec, self.dataset)

        def load() -> torch.nn.Module:
            weights = self.store.get(row["weights_sha256"])
            net = load_classifier(weights, row["arch"], input_spec, device=self.device)
            return gpu.prepare_model(net, self.device)

        return model_cache.cached_network(model_cache.network_key(row, self.device), load)

    def other_models(self, ids: Sequence[str], what: str) -> list[torch.nn.Module]:
        """The models named by ``ids`` (in that order); GauntletError if one is unknown."""
        missing = [i for i in ids if self.others.get(i) is None]
        if missing:
            raise GauntletError(f"{what} {missing[0][:12]} is unknown")
        return [self.load_model(self.others[i]) for i in ids]

    @cached_property
    def net(self) -> torch.nn.Module:
        """The submitted network."""
        return self.load_model(self.model)

    @cached_property
    def defended(self) -> torch.nn.Module:
        """The deployed model: the network, wrapped in the spec's defense if it has one."""
        if not self.spec.get("defense"):
            return self.net
        from gauntlet.workers.defenses import build_defense
        from gauntlet.workers.defenses.state import prepare_defense

        defended = build_defense(self.spec["defense"], self.spec.get("defense_params"), self.net)
        defended = defended.eval()
        self.defense_state = prepare_defense(
            defended,
            dataset=self.dataset,
            model_sha=self.model.get("weights_sha256"),
            artifacts=self.store,
            data_root=self.data_root,
        )
        return defended

    # -- data -------------------------------------------------------------------------

    @cached_property
    def eval_data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, indices) of the evaluation subset; x and y on the job's device."""
        x, y, indices = eval_subset(self.dataset, self.spec["n"], self.seed, self.data_root)
        gpu.seed_everything(self.seed)
        return x.to(self.device), y.to(self.device), indices

    def train_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dataset's training split on the job's device."""
        x, y = load_split(self.dataset, "train", self.data_root)
        return x.to(self.device), y.to(self.device)

    # -- reporting --------------------------------------------------------------------

    def report(self, done: int, total: int) -> None:
        if self.progress:
            self.progress(done, total)

    def accuracy(self, name: str, correct: torch.Tensor) -> Metric:
        """A proportion metric with its Wilson interval."""
        k, n = int(correct.sum()), len(correct)
        low, high = results.wilson_interval(k, n)
        return Metric(name, k / n if n else 0.0, n, low, high)

    def result(
        self,
        metrics: list[Metric],
        clean: torch.Tensor,
        robust: torch.Tensor,
        details: dict,
        subtasks: Sequence = (),
    ) -> JobResult:
        """The job's result: per-example outcomes packed, where and how it ran."""
        if self.defense_state:
            details = {**details, "defense_state": self.defense_state}
        return JobResult(
            metrics=metrics,
            n=len(clean),
            clean=results.pack(clean),
            robust=results.pack(robust),
            worker_host=socket.gethostname(),
            device=self.device_label or str(self.device),
            code_version=code_version(),
            seconds=time.perf_counter() - self.started,
            details=details,
            subtasks=list(subtasks),
        )
