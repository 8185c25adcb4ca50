"""The boards: leaderboard, calibration, corruption, transfer, backdoor and privacy.

Each answers the rows the CLI's table shows, as JSON, without the models the caller
may not see (the leaderboard's ranks are recounted without them).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from gauntlet.scheduler import service
from gauntlet.scheduler.api.deps import get_app, viewer
from gauntlet.scheduler.app import App

router = APIRouter(tags=["boards"])

Dataset = Annotated[str | None, Query(max_length=100, description="Only this dataset.")]


def _board(name: str, summary: str):
    def read(dataset: Dataset = None, app: App = Depends(get_app), who=Depends(viewer)):
        return [asdict(row) for row in service.board(app, name, dataset=dataset, viewer=who)]

    read.__name__ = f"{name}_board"
    router.add_api_route(f"/{name}", read, methods=["GET"], summary=summary)


_board("leaderboard", "Robust accuracy per threat model (per-example worst case)")
_board("calibration", "Calibration: ECE, MCE, temperature, NLL, Brier, under attack")
_board("corruption", "Accuracy and ECE under common corruptions")
_board("transfer", "Transferability matrix: source model x target model")
_board("backdoor", "Backdoor attacks and defenses: clean accuracy and ASR")
_board("privacy", "PATE: answered queries, eps, student accuracy")
