"""``gauntlet demo``: the whole service on the embedded defaults, in a few minutes.

Trains two small CNNs on scikit-learn's digits (shipped offline): one standard, one
adversarially trained at the quick suite's budget. Saves both as safetensors, submits
them, drains the queue through a local Ray and prints the leaderboard, on which the
adversarially trained model should rank first on robust accuracy.
"""

from __future__ import annotations

import time

from rich.console import Console

from gauntlet.scheduler.app import App
from gauntlet.scheduler.boards.leaderboard import leaderboard
from gauntlet.scheduler.cli import tables
from gauntlet.scheduler.run import run_scheduler
from gauntlet.scheduler.submit import submit
from gauntlet.workers.datasets import load_split
from gauntlet.workers.models import save_classifier
from gauntlet.workers.training import train_classifier

ARCH = "small-cnn"
DATASET = "digits"
SUITE = "quick"
MODELS = (
    # name, adversarial eps used in training
    ("digits-standard", 0.0),
    ("digits-fgsm-at", 0.2),
)


def run_demo(
    app: App, *, console: Console | None = None, num_cpus: int | None = None, epochs: int = 20
) -> list:
    console = console or Console()
    start = time.perf_counter()
    from gauntlet.scheduler.submit import default_input_spec

    spec = default_input_spec(DATASET)
    x, y = load_split(DATASET, "train", app.settings.data_root)
    folder = app.settings.home / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    for name, eps in MODELS:
        with console.status(
            f"training {name} ({'FGSM-AT eps=' + str(eps) if eps else 'standard'})"
        ):
            net = train_classifier(
                x, y, arch=ARCH, spec=spec, epochs=epochs, adversarial_eps=eps, seed=0
            )
        path = folder / f"{name}.safetensors"
        save_classifier(net, path)
        report = submit(
            app.settings,
            app.engine,
            app.queue,
            path,
            arch=ARCH,
            dataset=DATASET,
            suite=SUITE,
            name=name,
        )
        console.print(f"submitted {name}: {report.jobs} evaluations, {report.enqueued} enqueued")
    stats = run_scheduler(app, drain=True, num_cpus=num_cpus, console=console)
    entries = leaderboard(app.engine, dataset=DATASET)
    for table in tables.leaderboard_tables(entries):
        console.print(table)
    from gauntlet.scheduler.boards.calibration import calibration_table

    console.print(tables.calibration_table(calibration_table(app.engine, dataset=DATASET)))
    console.print(
        f"{stats.done} jobs done, {stats.failed} failed, in {time.perf_counter() - start:.0f} s"
    )
    return entries
