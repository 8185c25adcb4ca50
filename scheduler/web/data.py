"""What the pages read: visible models, one model's jobs with metrics, its lineage.

Reads SQL only, as the boards do. Models may be private once accounts exist; every
page filters through ``visible`` so a private model never shows to someone else.
"""

from __future__ import annotations

from collections import defaultdict

import sqlalchemy as sa

from gauntlet.db.schema import Job, MetricRow, Model
from gauntlet.scheduler.ownership import visible_ids

DASH = "\u2014"


def _get(obj, key: str):
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def submitter(model_row: dict | None) -> str:
    """The owner's name where the row carries one (accounts), else a dash."""
    if not model_row:
        return DASH
    for key in ("owner_name", "owner", "submitter"):
        value = model_row.get(key)
        if value:
            return str(_get(value, "name") or value) if isinstance(value, dict) else str(value)
    return DASH


def _owner_names(conn) -> dict:
    """Account names by id, where accounts exist (a database from before them has none)."""
    if not sa.inspect(conn).has_table("users"):
        return {}
    return dict(conn.execute(sa.text("SELECT id, name FROM users")).all())


def _with_owner(conn, rows: list[dict]) -> list[dict]:
    if any(row.get("owner_id") is not None for row in rows):
        names = _owner_names(conn)
        for row in rows:
            if row.get("owner_id") is not None:
                row.setdefault("owner_name", names.get(row["owner_id"]))
    return rows


def all_models(engine: sa.Engine) -> dict[str, dict]:
    """Every model row with every column the schema has (and its owner's name), by id."""
    with engine.connect() as conn:
        rows = [dict(row._mapping) for row in conn.execute(sa.select(Model.__table__))]
        return {row["id"]: row for row in _with_owner(conn, rows)}


def visible_models(engine: sa.Engine, viewer=None) -> dict[str, dict]:
    """The models ``viewer`` may see, by the API's own rule (``ownership``)."""
    ids = visible_ids(engine, viewer)
    return {k: m for k, m in all_models(engine).items() if ids is None or k in ids}


def visible(engine: sa.Engine, model_id: str, viewer=None) -> bool:
    ids = visible_ids(engine, viewer)
    return ids is None or model_id in ids


def get_model(engine: sa.Engine, model_id: str) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(Model.__table__).where(Model.id == model_id)).first()
        return None if row is None else _with_owner(conn, [dict(row._mapping)])[0]


def model_jobs(engine: sa.Engine, model_id: str) -> list[dict]:
    """The model's jobs (oldest first), each with ``metrics``: name -> metric dict."""
    with engine.connect() as conn:
        jobs = [
            dict(row._mapping)
            for row in conn.execute(
                sa.select(Job.__table__).where(Job.model_id == model_id).order_by(Job.id)
            )
        ]
        ids = [job["id"] for job in jobs]
        metrics: dict[int, dict] = defaultdict(dict)
        # In chunks: a bound list that long would pass SQLite's parameter limit.
        for start in range(0, len(ids), 500):
            stmt = sa.select(MetricRow).where(MetricRow.job_id.in_(ids[start : start + 500]))
            for m in conn.execute(stmt):
                metrics[m.job_id][m.name] = {
                    "value": m.value,
                    "n": m.n,
                    "low": m.ci_low,
                    "high": m.ci_high,
                }
    for job in jobs:
        job["status"] = str(getattr(job["status"], "value", job["status"]))
        job["metrics"] = metrics.get(job["id"], {})
    return jobs


def lineage(engine: sa.Engine, model: dict) -> dict | None:
    """For a model a train job derived: its parent row and the train job (method, id).

    A derived model records its parent (``parent_id``); the train job that made it is
    the parent's train job whose derived weights are this model's weights.
    """
    parent_id = model.get("parent_id")
    if not parent_id:
        return None
    parent = get_model(engine, parent_id)
    stmt = sa.select(Job.id, Job.attack, Job.details).where(
        Job.model_id == parent_id, Job.kind == "train"
    )
    job = None
    with engine.connect() as conn:
        for job_id, attack, details in conn.execute(stmt):
            details = details or {}
            if details.get("derived_weights_sha256") == model.get("weights_sha256"):
                job = {"id": job_id, "method": details.get("method") or attack}
    return {"parent": parent, "job": job}
