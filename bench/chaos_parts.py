"""What ``bench/chaos.py`` needs beyond the tests' own helpers (a Redis server to kill,
a TCP proxy to cut, cheap suites): a model to attack and a database to cut.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import sqlalchemy as sa


def train_weights(folder: Path) -> Path:
    """A digits small CNN, briefly trained: the jobs only need a real model to attack."""
    from gauntlet.scheduler.submit import default_input_spec
    from gauntlet.workers.datasets import load_split
    from gauntlet.workers.models import save_classifier
    from gauntlet.workers.training import train_classifier

    x, y = load_split("digits", "train", folder)
    net = train_classifier(x, y, arch="small-cnn", spec=default_input_spec("digits"), epochs=2)
    path = folder / "digits.safetensors"
    save_classifier(net, path)
    return path


def postgres_url() -> str | None:
    """The PostgreSQL to cut, if one answers (GAUNTLET_BENCH_POSTGRES_URL, else local)."""
    url = os.environ.get(
        "GAUNTLET_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    try:
        with sa.create_engine(url).connect():
            return url
    except Exception:  # no driver, no server, no access: the fault is skipped
        return None


class CutDatabase:
    """A PostgreSQL schema of its own, reached through a TCP proxy that can be cut.

    ``url`` goes through the proxy; ``cut`` drops every connection and refuses new ones
    for a while, which is what a failover or a partition looks like to a scheduler.
    """

    def __init__(self, target_url: str):
        from tests.outage_helpers import TcpProxy

        self.target = sa.make_url(target_url)
        self.schema = f"chaos_{uuid.uuid4().hex[:10]}"
        self.proxy = TcpProxy((self.target.host or "127.0.0.1", self.target.port or 5432))
        through = self.target.set(host="127.0.0.1", port=self.proxy.port)
        self.url = through.render_as_string(hide_password=False)
        self.url += f"?options=-csearch_path%3D{self.schema}"

    def create(self) -> None:
        from gauntlet.db.session import upgrade

        with sa.create_engine(self.target).begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{self.schema}"'))
        upgrade(self.url)

    def cut(self, seconds: float) -> None:
        self.proxy.cut()
        time.sleep(seconds)
        self.proxy.restore()

    def drop(self) -> None:
        self.proxy.close()
        with sa.create_engine(self.target).begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
