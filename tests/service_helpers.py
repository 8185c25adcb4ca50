"""Helpers for the service tests: small trained digits models and a test App."""

from __future__ import annotations

from pathlib import Path

import torch

from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.app import App
from gauntlet.scheduler.submit import default_input_spec, submit
from gauntlet.workers.datasets import load_split
from gauntlet.workers.models import save_classifier
from gauntlet.workers.training import train_classifier
from tests.conftest import make_settings


def train_digits_models(folder: Path, epochs: int = 12) -> dict[str, Path]:
    """A standard and an adversarially trained small CNN on digits, as safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = default_input_spec("digits")
    x, y = load_split("digits", "train", folder)
    paths = {}
    for name, eps in (("standard", 0.0), ("robust", 0.2)):
        torch.manual_seed(0)
        net = train_classifier(
            x, y, arch="small-cnn", spec=spec, epochs=epochs, adversarial_eps=eps, seed=0
        )
        paths[name] = folder / f"{name}.safetensors"
        save_classifier(net, paths[name])
    return paths


def add_model(engine, id: str, name: str, **fields) -> bool:
    """upsert_model with the fields a test does not care about filled in."""
    defaults = {"arch": "mlp", "dataset": "digits", "input_spec": {}, "weights_sha256": "b" * 64}
    return lifecycle.upsert_model(engine, id=id, name=name, **(defaults | fields))


def make_app(home: Path, **overrides) -> App:
    return App(make_settings(home, **overrides))


def submit_digits(app: App, weights: Path, **options):
    """Submit a small CNN for digits (the suite defaults to `quick`)."""
    options.setdefault("suite", "quick")
    return submit(
        app.settings, app.engine, app.queue, weights, arch="small-cnn", dataset="digits", **options
    )


def run_eval(stored: tuple[dict, str], *, n: int, **spec):
    """Evaluate the stored model in-process with a PGD spec, overridden by ``spec``."""
    from gauntlet.workers.task import run_spec as evaluate

    model, store = stored
    return evaluate(pgd_spec(n=n, **spec), model, artifacts=store, data_root="")


def pgd_spec(**spec) -> dict:
    """A 10-step Linf PGD eval spec on digits (eps 0.2, seed 0), overridden by ``spec``."""
    base = {
        "dataset": "digits",
        "attack": "pgd",
        "params": {"steps": 10},
        "norm": "linf",
        "eps": 0.2,
        "seed": 0,
        "batch_size": 64,
    }
    return {**base, **spec}


def metric(result, name: str) -> float:
    return next(m.value for m in result.metrics if m.name == name)


def start_local_ray(num_cpus: int, num_gpus: int):
    """A quiet local Ray with ``num_gpus`` logical GPUs, started as the scheduler starts
    one; the caller shuts it down."""
    from gauntlet.cluster.ray_conn import init_ray
    from gauntlet.cluster.settings import Settings

    ray = init_ray(Settings.from_env({}), num_cpus=num_cpus, num_gpus=num_gpus)
    # A Ray left running by another test would have other resources than asked for.
    assert ray.cluster_resources().get("CPU") == num_cpus, ray.cluster_resources()
    return ray
