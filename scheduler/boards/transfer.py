"""The transferability matrix: how often examples crafted on one model fool another.

Row = source (the surrogate the examples were crafted on), column = target. Each cell
is the success rate (fooled / attacked, among points the target classifies correctly)
of the latest finished transfer job for that pair and threat (Liu et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from gauntlet.db.schema import Job, MetricRow, Model
from gauntlet.scheduler.boards.metrics import done_rows


@dataclass
class Cell:
    dataset: str
    norm: str
    eps: float
    source_id: str
    source: str
    target_id: str
    target: str
    success_rate: float
    n: int
    low: float | None
    high: float | None


def transfer_matrix(engine: sa.Engine, *, dataset: str | None = None) -> list[Cell]:
    source = sa.orm.aliased(Model)
    threat = (Job.dataset, Job.norm, Job.eps)
    pair = (source.id, source.name, Model.id, Model.name)
    metric = (MetricRow.value, MetricRow.n, MetricRow.ci_low, MetricRow.ci_high)
    stmt = (
        sa.select(*threat, *pair, *metric)
        .join(Model, Model.id == Job.model_id)
        .join(source, source.id == Job.source_model_id)
        .join(MetricRow, sa.and_(MetricRow.job_id == Job.id, MetricRow.name == "success_rate"))
        .where(Job.defense.is_(None))
    )
    cells: dict[tuple, Cell] = {}
    for row in done_rows(engine, stmt, dataset=dataset):
        cell = Cell(*row)
        # Ordered by id: a later run of the same pair replaces an earlier one.
        cells[(cell.dataset, cell.norm, cell.eps, cell.source_id, cell.target_id)] = cell
    return sorted(cells.values(), key=lambda c: (c.dataset, c.norm, c.eps, c.source, c.target))
