"""``gauntlet verify JOB``, and the provenance table ``gauntlet job`` shows."""

from __future__ import annotations

from dataclasses import asdict

import click

from gauntlet.scheduler.cli import _app, _print_json, main, say
from gauntlet.scheduler.cli.tables import _row, _table

_PROVENANCE = (
    ("gauntlet", "gauntlet"),
    ("git commit", "git_commit"),
    ("torch", "torch"),
    ("CUDA", "cuda"),
    ("cuDNN", "cudnn"),
    ("device model", "device_model"),
    ("seed", "seed"),
    ("batch size", "batch_size"),
    ("wall seconds", "wall_seconds"),
    ("adversarial sha256", "adversarial_sha256"),
)


def provenance_table(record: dict):
    """A job's provenance record as a two-column table (absent fields are left out)."""
    table = _table("provenance")
    table.add_column("field")
    table.add_column("value", overflow="fold")  # hashes are long words
    for label, key in _PROVENANCE:
        if key in record:
            value = record[key]
            _row(table, [label, "-" if value is None else value])
    return table


@main.command("verify")
@click.argument("job_id", type=int, metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def verify_cmd(ctx, job_id, as_json):
    """Rerun a done eval job here; compare per-example outcomes and the adversarial hash.

    On CPU the outcomes must be identical; on GPU up to 0.5% of the points may flip.
    Exits with status 1 when the rerun differs.
    """
    from gauntlet.scheduler import service

    # Always the local stack: the rerun happens in this process, on this machine.
    report = service.verify_job(_app(ctx), job_id)
    if as_json:
        _print_json({**asdict(report), "ok": report.ok})
    else:
        say(f"job {job_id}: {report.verdict} ({report.device}, {report.n} points)")
        say(
            f"points differing: {report.points_differing} of {report.n} "
            f"(clean {report.clean_flips}, robust {report.robust_flips}; "
            f"allowed {report.allowed})"
        )
        hashes = {True: "same", False: "different", None: "none stored"}[report.hash_matches]
        say(f"adversarial examples' sha256: {hashes}")
    if not report.ok:
        ctx.exit(1)
