"""Benchmark: web page load times with 100 models and 10,000 jobs in the database.

Run from the repository root: ``python bench/web.py`` (``--models``, ``--jobs-per-model``,
``--n``, ``--repeats``). Models and finished jobs are written to a temporary SQLite
database through the lifecycle layer (insert, claim, finish: the scheduler's own path)
with fake metrics and outcome bitsets, so the boards read what real jobs would leave.
Per model: a clean job, a calibration job (with reliability bins), a corruption job
(45 severities), one PGD job with an eps sweep, and attacks at four budgets. A server
then answers on a local port, and each page is fetched ``--repeats`` times after one
warm-up fetch. Printed: the time to fill the database, then per page the median and
the fastest fetch, the page's size, and the leaderboard query alone for comparison.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script

import numpy as np  # noqa: E402

from gauntlet.cluster.settings import Settings  # noqa: E402
from gauntlet.scheduler import lifecycle, service  # noqa: E402
from gauntlet.scheduler.app import App  # noqa: E402
from gauntlet.workers.results import JobResult, Metric, pack, wilson_interval  # noqa: E402

CORRUPTIONS = (
    "brightness",
    "contrast",
    "defocus-blur",
    "gaussian-noise",
    "jpeg",
    "pixelate",
    "shot-noise",
    "impulse-noise",
    "gaussian-blur",
)
EPS = (0.05, 0.1, 0.2, 0.3)


def _metric(name: str, hits: np.ndarray) -> Metric:
    k, n = int(hits.sum()), len(hits)
    low, high = wilson_interval(k, n)
    return Metric(name, k / n, n, low, high)


def _plan(model_id: str, jobs: int) -> list[lifecycle.NewJob]:
    """``jobs`` jobs for one model: the fixed kinds, then attacks x budgets to fill up."""
    subset = "digits:test:bench:0"
    kinds = [
        ("clean", "eval", None, None),
        ("pgd", "calibration", "linf", 0.2),
        ("clean", "corruption", None, None),
        ("pgd-sweep", "eval", "linf", 0.2),
    ]
    attack = 0
    while len(kinds) < jobs:
        for eps in EPS:
            if len(kinds) < jobs:
                kinds.append((f"attack-{attack}", "eval", "linf", eps))
        attack += 1
    return [
        lifecycle.NewJob(
            job_key=f"{model_id}:{i}",
            model_id=model_id,
            kind=kind,
            suite="bench",
            spec={"attack": name, "kind": kind, "norm": norm, "eps": eps},
            dataset="digits",
            attack=name,
            norm=norm,
            eps=eps,
            subset_key=subset,
        )
        for i, (name, kind, norm, eps) in enumerate(kinds)
    ]


def _result(job: lifecycle.NewJob, clean: np.ndarray, rng) -> JobResult:
    n = len(clean)
    robust = clean & (rng.random(n) < rng.uniform(0.2, 0.9))
    metrics = [_metric("clean_accuracy", clean), _metric("robust_accuracy", robust)]
    details: dict = {"flags": [], "adaptations": []}
    if job.kind == "calibration":
        counts = rng.integers(0, n // 10, 15)
        lo = np.linspace(0, 1, 16)
        details["reliability"] = {
            "lo": lo[:-1].tolist(),
            "hi": lo[1:].tolist(),
            "accuracy": np.clip(lo[:-1] + rng.normal(0, 0.05, 15), 0, 1).tolist(),
            "confidence": (lo[:-1] + 1 / 30).tolist(),
            "count": counts.tolist(),
            "ece": 0.05,
        }
        metrics += [Metric(m, float(rng.random()), n) for m in ("ece", "mce", "nll", "brier")]
    elif job.kind == "corruption":
        for name in CORRUPTIONS:
            for severity in range(1, 6):
                metrics.append(Metric(f"acc@{name}@{severity}", 1 - 0.1 * severity, n))
            metrics.append(Metric(f"acc@{name}", 0.7, n))
        metrics.append(Metric("mean_corruption_accuracy", 0.7, n))
    elif job.attack == "pgd-sweep":
        details["curve"] = {"eps": [0.05, 0.1, 0.4], "robust_accuracy": [0.8, 0.6, 0.1]}
    return JobResult(metrics, n, pack(clean), pack(robust), seconds=1.0, details=details)


def fill(app: App, models: int, jobs_per_model: int, n: int) -> None:
    rng = np.random.default_rng(0)
    for m in range(models):
        model_id = f"{m:064x}"
        lifecycle.upsert_model(
            app.engine,
            id=model_id,
            name=f"model-{m:03d}",
            arch="small-cnn",
            dataset="digits",
            input_spec={},
            weights_sha256=f"{m:064x}",
        )
        plan = _plan(model_id, jobs_per_model)
        ids = lifecycle.insert_jobs(app.engine, plan)
        clean = rng.random(n) < rng.uniform(0.8, 0.99)
        for job_id, job in zip(ids, plan, strict=True):
            claim = lifecycle.claim(app.engine, job_id, "bench", 600)
            lifecycle.finish(app.engine, job_id, "bench", claim.attempt, _result(job, clean, rng))


def _serve(app: App) -> tuple[object, str]:
    import fastapi
    import uvicorn

    from gauntlet.scheduler.web import install

    api = fastapi.FastAPI()
    install(api, app)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def _time(fetch, repeats: int) -> tuple[float, float, int]:
    size = len(fetch())  # warm-up: first-use imports and caches are not the page's cost
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fetch()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--jobs-per-model", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000, help="points per job")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import httpx

    # tmpfs where there is one: the bench times reading, not the disk's fsyncs when filling.
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=root) as home:
        app = App(Settings.from_env({"GAUNTLET_HOME": home}))
        start = time.perf_counter()
        fill(app, args.models, args.jobs_per_model, args.n)
        jobs = args.models * args.jobs_per_model
        print(f"filled {args.models} models, {jobs} jobs: {time.perf_counter() - start:.1f} s")
        server, base = _serve(app)
        client = httpx.Client(base_url=base, timeout=120)
        model_id = f"{args.models // 2:064x}"
        pages = {
            "leaderboard /": "/",
            "leaderboard /leaderboard/digits/linf": "/leaderboard/digits/linf",
            "model page /models/ID": f"/models/{model_id}",
            "calibration board": "/boards/calibration",
            "job page": f"/jobs/{args.jobs_per_model * (args.models // 2) + 1}",
        }
        for label, path in pages.items():

            def fetch(path=path):
                response = client.get(path)
                response.raise_for_status()
                return response.content

            median, best, size = _time(fetch, args.repeats)
            print(
                f"{label:40s} median {1000 * median:8.1f} ms  best {1000 * best:8.1f} ms"
                f"  {size / 1024:7.1f} KiB"
            )
        median, best, _ = _time(lambda: service.leaderboard(app), args.repeats)
        print(
            f"{'service.leaderboard alone':40s} median {1000 * median:8.1f} ms"
            f"  best {1000 * best:8.1f} ms"
        )
        server.should_exit = True
        client.close()
        app.close()


if __name__ == "__main__":
    main()
