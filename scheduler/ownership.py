"""Who may see and operate which model, and the listings that follow from it.

A model submitted through the API belongs to its account and is private until it is
published; one submitted through the local CLI has no owner and is public. A private
model, and every job and board row of it, is visible to its owner and to admins only.
To anyone else it does not exist: reads answer "not found", never "forbidden", so
its existence is not disclosed either. Writes (cancel, rerun, publish) need the owner
or an admin.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import sqlalchemy as sa

from gauntlet.db.schema import Job, Model, User
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.accounts import Forbidden, NotFound, Viewer


def visible(viewer: Viewer | None):
    """The SQL condition on ``models`` of what ``viewer`` may see."""
    if viewer is not None and viewer.is_admin:
        return sa.true()
    if viewer is None:
        return Model.public.is_(True)
    return sa.or_(Model.public.is_(True), Model.owner_id == viewer.id)


def _model_columns():
    owner = sa.select(User.name).where(User.id == Model.owner_id).scalar_subquery()
    return (Model.__table__, owner.label("owner"))


def list_models(engine: sa.Engine, viewer: Viewer | None) -> list[dict[str, Any]]:
    stmt = sa.select(*_model_columns()).where(visible(viewer))
    with engine.connect() as conn:
        rows = conn.execute(stmt.order_by(Model.created_at, Model.id))
        return [dict(row._mapping) for row in rows]


def get_model(engine: sa.Engine, viewer: Viewer | None, model_id: str) -> dict[str, Any]:
    """The model ``model_id`` (a full id), or NotFound when it is absent or hidden."""
    stmt = sa.select(*_model_columns()).where(Model.id == model_id, visible(viewer))
    with engine.connect() as conn:
        row = conn.execute(stmt).first()
    if row is None:
        raise NotFound(f"there is no model {model_id!r}")
    return dict(row._mapping)


def check_writable(model: dict[str, Any], viewer: Viewer) -> None:
    """Only the owner or an admin may change a model or its jobs."""
    if not viewer.is_admin and model["owner_id"] != viewer.id:
        raise Forbidden(f"model {model['id'][:12]} belongs to another account")


def publish(engine: sa.Engine, viewer: Viewer, ref: str) -> dict[str, Any]:
    """Make a model public; ``ref`` is an id (API) or a name or id prefix (operator)."""
    if viewer.is_operator:
        from gauntlet.scheduler.train import find_model

        model = find_model(engine, ref)
    else:
        model = get_model(engine, viewer, ref)
        check_writable(model, viewer)
    with engine.begin() as conn:
        conn.execute(sa.update(Model).where(Model.id == model["id"]).values(public=True))
    return {**model, "public": True}


def list_jobs(
    engine: sa.Engine,
    viewer: Viewer | None,
    *,
    status: str | None = None,
    model: str | None = None,
    dataset: str | None = None,
    limit: int | None = 200,
) -> list[dict[str, Any]]:
    """``lifecycle.list_jobs``, restricted to the jobs of models ``viewer`` may see."""
    filters = {"status": status, "model": model, "dataset": dataset, "limit": limit}
    return lifecycle.list_jobs(engine, where=visible(viewer), **filters)


def job_model(engine: sa.Engine, viewer: Viewer | None, job_id: int) -> dict[str, Any]:
    """The model of job ``job_id``, or NotFound when the job is absent or hidden."""
    stmt = (
        sa.select(Model.id, Model.owner_id, Model.public)
        .join(Job, Job.model_id == Model.id)
        .where(Job.id == job_id, visible(viewer))
    )
    with engine.connect() as conn:
        row = conn.execute(stmt).first()
    if row is None:
        raise NotFound(f"there is no job {job_id}")
    return dict(row._mapping)


def visible_ids(engine: sa.Engine, viewer: Viewer | None) -> set[str] | None:
    """Ids of the models ``viewer`` may see; None when that is every model."""
    if viewer is not None and viewer.is_admin:
        return None
    with engine.connect() as conn:
        return set(conn.scalars(sa.select(Model.id).where(visible(viewer))))


def filter_board(name: str, rows: list, ids: set[str] | None) -> list:
    """A board's rows without hidden models; the leaderboard's ranks are recounted.

    A transfer cell needs both its source and its target visible. Each leaderboard
    entry's numbers are its own model's, so dropping others changes only the ranks.
    """
    if ids is None:
        return rows
    if name == "transfer":
        return [c for c in rows if c.source_id in ids and c.target_id in ids]
    kept = [row for row in rows if row.model_id in ids]
    if name != "leaderboard":
        return kept
    ranked, rank, group = [], 0, None
    for entry in kept:  # already sorted by table, then rank
        table = (entry.dataset, entry.norm, entry.eps, entry.subset_key)
        rank = rank + 1 if table == group else 1
        group = table
        ranked.append(replace(entry, rank=rank))
    return ranked
