"""What a submission must pass before anything is stored or queued.

``submit.submit`` checks that the file is safetensors and that the names resolve; this
layer adds the checks that keep one request from costing more than a deployment
allows, or from storing text the database or a terminal cannot hold: names are
bounded and printable, the file's size is capped before it is read, the architecture's
parameter count is capped before anything is built, each job's work is capped before
it is queued, and weights that are not float32 are refused (integers) or converted
with a note on the model (other floats). Every failure is a ``GauntletError`` with a
message naming what to change.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.cluster.settings import Settings
from gauntlet.db.schema import Model
from gauntlet.scheduler.submit import default_input_spec, expand_suite
from gauntlet.scheduler.suites import load_suite
from gauntlet.workers.architectures import (
    build_architecture,
    check_architecture,
    check_architecture_size,
)
from gauntlet.workers.datasets import dataset_info
from gauntlet.workers.models import InputSpec, check_safetensors, dtype_note, header_dtypes

# One bound for every user-given name stored in SQL: SQLite would store any length while
# PostgreSQL refuses more than the column holds, so the limit is enforced here, the same
# on both, rather than discovered as a database error halfway through a submission.
MAX_NAME = 200


def comma_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    """ "0.5,0.5,0.5" as floats (a per-channel mean or std); None stays None."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise GauntletError(
            f"Expected `{what}` to be numbers separated by commas, but got {text!r}"
        ) from None


def check_name(value, what: str) -> str:
    """A name to store: a string of 1 to 200 printable characters (no newlines, tabs or
    other control characters, which would break one-line listings and logs)."""
    if not isinstance(value, str) or not value:
        raise GauntletError(f"Expected the {what} to be a non-empty string, but got {value!r}")
    if len(value) > MAX_NAME:
        raise GauntletError(
            f"Expected the {what} to be at most {MAX_NAME} characters, but it has "
            f"{len(value)}: {value[:40]!r}..."
        )
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise GauntletError(
            f"Expected the {what} to hold printable characters only, but {value!r} contains {bad!r}"
        )
    return value


def check_weights_file(weights, max_bytes: int) -> Path:
    """The weights path: an existing regular file no larger than ``max_bytes``.

    The size comes from ``stat``, before a byte is read or hashed: the artifact store
    copies the whole file, so an oversized one must be refused first.
    """
    path = Path(weights)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise GauntletError(f"weights file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise GauntletError(f"cannot read weights file {str(path)!r}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise GauntletError(
            f"weights file {str(path)!r} is a directory; give the path of a .safetensors file"
        )
    if not stat.S_ISREG(info.st_mode):
        raise GauntletError(f"weights file {str(path)!r} is not a regular file")
    if info.st_size > max_bytes:
        raise GauntletError(
            f"weights file {str(path)!r} has {info.st_size:,} bytes, above the cap of "
            f"{max_bytes:,} (GAUNTLET_MAX_WEIGHTS_BYTES)"
        )
    if not os.access(path, os.R_OK):
        raise GauntletError(f"cannot read weights file {str(path)!r}: permission denied")
    return path


def weights_note(path: Path, arch: str, spec: InputSpec, max_parameters: int) -> str | None:
    """Cap the architecture's size, then check the file's dtypes against the network's.

    The network is built on the meta device (shapes and dtypes, no memory) only once its
    parameter count is known to be under the cap. Returns the conversion note, if any.
    """
    check_architecture_size(arch, spec, max_parameters)
    with torch.device("meta"):
        expected = build_architecture(arch, spec).state_dict()
    return dtype_note(arch, header_dtypes(check_safetensors(path)), expected)


def check_work(suite: str, dataset: str, n: int | None, max_work: int) -> None:
    """Every job the suite would queue, transfer jobs included, is under the work cap."""
    placeholder = "0" * 64  # work does not depend on the model, only on the evaluation
    specs = expand_suite(suite, placeholder, dataset, n)
    loaded = load_suite(suite)
    if loaded.transfer is not None:
        max_n = dataset_info(dataset).test_size
        specs += loaded.transfer_specs(placeholder, placeholder, dataset, n=n, max_n=max_n)
    for spec in specs:
        try:
            spec.check_work(max_work)
        except GauntletError as exc:
            raise GauntletError(f"suite {suite!r}: {exc}") from None


def check_submission(settings: Settings, weights, submission: Mapping[str, Any]) -> str | None:
    """Every check of a submission, cheapest first; returns the model's note, if any.

    ``submission`` holds ``submit``'s keyword arguments (arch, dataset, suite, name, n,
    input_overrides, card); the checks write back what ``submit`` stores: the card as
    checked, and ``onnx`` as the architecture of an ONNX file.
    """
    from gauntlet.scheduler.cards import check_card
    from gauntlet.workers import onnx_models

    if submission.get("card") is not None:
        submission["card"] = check_card(submission["card"])
    onnx = onnx_models.is_onnx(weights, submission.get("arch"))
    if onnx:
        submission["arch"] = onnx_models.ARCH
    arch, dataset, suite = submission["arch"], submission["dataset"], submission["suite"]
    name, n = submission.get("name"), submission.get("n")
    path = check_weights_file(weights, settings.max_weights_bytes)
    # The name stored is submit's: the one given, else the file's stem (also user text).
    check_name(name or path.stem, "model name" if name else "model name (the file's name)")
    check_name(suite, "suite name")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise GauntletError(f"Expected `--n` to be a positive integer, but got {n!r}")
    if not onnx:
        check_architecture(arch)
    spec = default_input_spec(dataset, **(submission.get("input_overrides") or {}))
    load_suite(suite)
    if onnx:
        # The graph is converted and run once here, so a graph the worker could not run
        # is refused now rather than failing every job.
        from gauntlet.workers.models import load_classifier

        onnx_models.check_onnx(path, settings.max_parameters)
        load_classifier(path, arch, spec)
        note = None
    else:
        check_safetensors(path)
        note = weights_note(path, arch, spec, settings.max_parameters)
    check_work(suite, dataset, n, settings.max_job_work)
    return note


def store_card(engine: sa.Engine, model_id: str, card: dict | None) -> None:
    from gauntlet.scheduler.cards import store_card as store

    store(engine, model_id, card)


def store_note(engine: sa.Engine, model_id: str, note: str | None) -> None:
    """Record the note on the model row (left as it is when one is already there)."""
    if note is None:
        return
    stmt = sa.update(Model).where(Model.id == model_id, Model.note.is_(None)).values(note=note)
    with engine.begin() as conn:
        conn.execute(stmt)
