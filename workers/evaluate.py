"""One evaluation job, start to finish, inside a worker: load, attack, measure.

Everything arrives as plain data (the job spec and the model row); the result goes back
as a ``JobResult``. Problems the submitter can fix (a corrupt file, weights that do not
fit the architecture, a model whose input does not match the dataset) raise
``GauntletError`` and become a permanent failure of this one job.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from importlib import metadata

import torch

from cluster.artifacts import ArtifactStore
from cluster.errors import GauntletError
from workers import outcomes
from workers.attacks import Threat, build_attack
from workers.datasets import dataset_info, eval_subset
from workers.metrics import attack_metrics
from workers.models import InputSpec, load_classifier
from workers.result import JobResult


def code_version() -> str:
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


def evaluate(
    spec: dict,
    model: dict,
    *,
    artifacts: str,
    data_root: str,
    progress: Callable[[int, int], None] | None = None,
    device_label: str | None = None,
) -> JobResult:
    start = time.perf_counter()
    input_spec = InputSpec.from_dict(model["input_spec"])
    check_input_matches(input_spec, spec["dataset"])
    weights = ArtifactStore(artifacts).get(model["weights_sha256"])
    device = pick_device()
    net = load_classifier(weights, model["arch"], input_spec, device=device)

    x, y, _ = eval_subset(spec["dataset"], spec["n"], spec["seed"], data_root)
    x, y = x.to(device), y.to(device)
    attack = build_attack(spec["attack"], spec.get("params") or {})
    threat = None if spec.get("norm") is None else Threat(spec["norm"], float(spec["eps"]))
    generator = torch.Generator(device=device).manual_seed(int(spec["seed"]))
    result = attack(
        net,
        x,
        y,
        threat,
        batch_size=spec.get("batch_size", 256),
        generator=generator,
        progress=progress,
    )
    return JobResult(
        metrics=attack_metrics(x, result),
        n=len(y),
        clean=outcomes.pack(result.clean_correct),
        robust=outcomes.pack(result.robust),
        worker_host=socket.gethostname(),
        device=device_label or str(device),
        code_version=code_version(),
        seconds=time.perf_counter() - start,
        details={"attack_config": repr(attack), "grad_evals": result.grad_evals},
    )
