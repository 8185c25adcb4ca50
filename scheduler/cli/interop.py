"""Commands for models researchers already hold and tools they already use: model,
export, convert."""

from __future__ import annotations

import click
from rich.table import Table

from gauntlet.scheduler.cli import _app, _print_json, main, say, services, show_table
from gauntlet.scheduler.cli.tables import _row, _table, _text


@main.command("model")
@click.argument("ref", metavar="MODEL")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def model_command(ctx, ref, as_json):
    """One model (a name or id prefix): its card and every job with its metrics."""
    report = services(ctx).model_report(ref)
    if as_json:
        return _print_json(report)
    for table in model_tables(report):
        show_table(table)


def model_tables(report: dict) -> list[Table]:
    """The model and its card as name/value lines, then one row per job.

    Metrics are many and their names long, so each job's metrics go in one cell, one
    per line: the table stays three columns wide and fits any terminal.
    """
    model, card = report["model"], report["card"] or {}
    about = _table(f"model {model['name']}")
    about.add_column("field")
    about.add_column("value", overflow="fold")
    for key in ("id", "arch", "dataset", "created_at", "parent_id", "note"):
        if model.get(key):
            _row(about, [key, model[key]])
    for key, value in card.items():
        _row(about, [f"card: {key}", value])
    jobs = _table(f"{len(report['jobs'])} jobs", "value [95% interval] (n)")
    jobs.add_column("job")
    jobs.add_column("evaluation", overflow="fold")
    jobs.add_column("metrics", overflow="fold")
    for job in report["jobs"]:
        threat = "" if job["norm"] is None else f" {job['norm']} {job['eps']:.4g}"
        what = f"{job['kind']} {job['attack']}{threat}"
        if job["defense"]:
            what += f" + {job['defense']}"
        lines = [_metric(name, m) for name, m in job["metrics"].items()]
        if job["error"]:
            lines.append(f"error: {job['error']}")
        jobs.add_row(
            _text(f"{job['id']} {job['status']}"), _text(what), _text("\n".join(lines) or "-")
        )
    return [about, jobs]


def _metric(name: str, m: dict) -> str:
    interval = "" if m["ci_low"] is None else f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
    return f"{name} {m['value']:.4g}{interval} ({m['n']})"


@main.command()
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(["robustbench", "csv", "json"]),
    help="robustbench: a model_info JSON per model; csv, json: the leaderboard's rows.",
)
@click.option("--out", default=".", show_default=True, help="Folder to write into.")
@click.option("--dataset", help="Only this dataset.")
@click.pass_context
def export(ctx, fmt, out, dataset):
    """Write the leaderboard in another tool's format."""
    from gauntlet.scheduler import service

    paths = service.export(_app(ctx), fmt, out, dataset=dataset)
    say(f"wrote {len(paths)} file{'s' if len(paths) != 1 else ''} under {out}")


@main.command()
@click.argument("checkpoint")
@click.option("--arch", required=True, help="Architecture (see `gauntlet list archs`).")
@click.option("--out", help="Output file (default: the checkpoint's name, .safetensors).")
def convert(checkpoint, arch, out):
    """Convert a PyTorch checkpoint you trust into safetensors, on your own machine.

    It is read with torch.load(weights_only=True); containers ("state_dict", "model",
    "net") are opened, "module." prefixes stripped and RobustBench's WideResNet and
    PreAct ResNet names mapped onto gauntlet's.
    """
    from gauntlet.workers.convert import convert_checkpoint

    path, renamed = convert_checkpoint(checkpoint, arch, out)
    note = f" ({len(renamed)} keys renamed from RobustBench's names)" if renamed else ""
    say(f"wrote {path}{note}")
