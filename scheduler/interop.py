"""One model in full, and the leaderboard in other tools' formats.

``model_report`` is what ``gauntlet model`` (and the HTTP API) show: the model, its
card and every job with every stored metric. ``robustbench_infos`` writes RobustBench's
``model_info`` records, the submitter's claims from the card beside what gauntlet
measured; ``export_rows`` flattens the leaderboard for spreadsheets and scripts.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict
from pathlib import Path

import sqlalchemy as sa

from gauntlet.cluster.errors import GauntletError
from gauntlet.db.schema import Job, JobStatus, MetricRow
from gauntlet.scheduler.boards.leaderboard import leaderboard
from gauntlet.scheduler.train import find_model

FORMATS = ("robustbench", "csv", "json")
_THREATS = {"linf": "Linf", "l2": "L2", "l1": "L1"}


def model_report(engine: sa.Engine, ref: str) -> dict:
    """The model matching ``ref`` (a name or id prefix), its card and its jobs' metrics."""
    model = find_model(engine, ref)
    stmt = (
        sa.select(
            Job.id, Job.kind, Job.suite, Job.attack, Job.norm, Job.eps, Job.defense,
            Job.source_model_id, Job.status, Job.error,
        )
        .where(Job.model_id == model["id"])
        .order_by(Job.id)
    )  # fmt: skip
    metric_stmt = (
        sa.select(*MetricRow.__table__.c)
        .join(Job, Job.id == MetricRow.job_id)
        .where(Job.model_id == model["id"])
        .order_by(MetricRow.job_id, MetricRow.name)
    )
    with engine.connect() as conn:
        jobs = [dict(row._mapping) for row in conn.execute(stmt)]
        metrics = list(conn.execute(metric_stmt))
    by_job: dict[int, dict] = {}
    for m in metrics:
        by_job.setdefault(m.job_id, {})[m.name] = {
            "value": m.value, "n": m.n, "ci_low": m.ci_low, "ci_high": m.ci_high,
        }  # fmt: skip
    for job in jobs:
        job["status"] = str(getattr(job["status"], "value", job["status"]))
        job["metrics"] = by_job.get(job["id"], {})
    info = {k: model[k] for k in ("id", "name", "arch", "dataset", "input_spec", "note")}
    info["created_at"] = model["created_at"].isoformat()
    info["parent_id"] = model.get("parent_id")
    return {"model": info, "card": model.get("card"), "jobs": jobs}


def _eps_text(eps: float) -> str:
    """A short decimal as it is ("0.2"), else RobustBench's fraction of 255 ("8/255")."""
    if len(repr(eps)) <= 6:
        return repr(eps)
    scaled = eps * 255
    if abs(scaled - round(scaled)) < 1e-6:
        return f"{round(scaled)}/255"
    return repr(eps)


def _autoattack(engine: sa.Engine) -> dict[tuple, float]:
    """(model id, norm, eps, subset) -> robust accuracy of its bare autoattack job."""
    stmt = (
        sa.select(Job.model_id, Job.norm, Job.eps, Job.subset_key, MetricRow.value)
        .join(MetricRow, MetricRow.job_id == Job.id)
        .where(
            Job.status == JobStatus.done,
            Job.attack == "autoattack",
            Job.defense.is_(None),
            MetricRow.name == "robust_accuracy",
        )
        .order_by(Job.id)
    )
    with engine.connect() as conn:
        return {(r[0], r[1], r[2], r[3]): r[4] for r in conn.execute(stmt)}


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.2f}"


def robustbench_infos(engine: sa.Engine, *, dataset: str | None = None) -> list[dict]:
    """One ``model_info`` record per bare model and threat model on the leaderboard.

    Accuracies are percentages written as strings, as RobustBench's JSON files have
    them. ``clean_acc`` and ``autoattack_acc`` are measured (null when no autoattack job
    ran); ``reported`` is the card's claim; ``unreliable`` is true when gauntlet's
    reliability checks flagged the entry or the card says so.
    """
    from gauntlet.scheduler.lifecycle import list_models

    models = {m["id"]: m for m in list_models(engine)}
    autoattack = _autoattack(engine)
    infos = []
    for entry in leaderboard(engine, dataset=dataset):
        if entry.defense is not None:
            continue  # RobustBench lists models, not model + test-time defense pairs
        card = models[entry.model_id].get("card") or {}
        aa = autoattack.get((entry.model_id, entry.norm, entry.eps, entry.subset_key))
        infos.append(
            {
                "name": card.get("name", entry.model),
                "authors": card.get("authors"),
                "link": card.get("link"),
                "venue": card.get("venue"),
                "architecture": card.get("architecture", entry.arch),
                "dataset": entry.dataset,
                "threat_model": _THREATS.get(entry.norm, entry.norm),
                "eps": _eps_text(entry.eps),
                "clean_acc": _pct(entry.clean_accuracy),
                "reported": _reported(card.get("reported")),
                "autoattack_acc": _pct(aa),
                "additional_data": bool(card.get("additional_data", False)),
                "number_forward_passes": card.get("number_forward_passes", 1),
                "unreliable": bool(entry.unreliable) or bool(card.get("unreliable", False)),
                "gauntlet": {
                    "model_id": entry.model_id,
                    "robust_acc": _pct(entry.robust_accuracy),
                    "n": entry.n,
                    "unreliable_because": entry.unreliable,
                },
            }
        )
    return infos


def _reported(value) -> str | None:
    return None if value is None else f"{value:.2f}"


def export_rows(engine: sa.Engine, *, dataset: str | None = None) -> list[dict]:
    """The leaderboard's entries as flat rows (lists joined by "; ")."""
    rows = []
    for entry in leaderboard(engine, dataset=dataset):
        row = asdict(entry)
        row["attacks"] = "; ".join(entry.attacks)
        row["unreliable"] = "; ".join(entry.unreliable)
        row["stale"] = "; ".join(entry.stale)
        rows.append(row)
    return rows


def _file_name(text: str) -> str:
    # Model names are user text: keep them readable but never a path of their own.
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


def write_export(
    engine: sa.Engine, fmt: str, out: str | Path, *, dataset: str | None = None
) -> list[Path]:
    """Write the export under ``out``; the files written."""
    if fmt not in FORMATS:
        raise GauntletError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "robustbench":
        written = []
        for info in robustbench_infos(engine, dataset=dataset):
            # RobustBench's layout: model_info/<dataset>/<threat model>/<name>.json.
            folder = out / info["dataset"] / info["threat_model"]
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"{_file_name(info['name'])}_{info['gauntlet']['model_id'][:8]}"
            path = folder / f"{stem}.json"
            path.write_text(json.dumps(info, indent=2) + "\n")
            written.append(path)
        return written
    rows = export_rows(engine, dataset=dataset)
    path = out / f"leaderboard.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows, indent=2) + "\n")
    else:
        with path.open("w", newline="") as f:
            fields = list(rows[0]) if rows else ["rank", "model", "dataset"]
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return [path]
