"""Commands that put work on the queue or show it: submit, jobs, train, backdoor, pate,
explain, subtasks."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler.cli import (
    _app,
    _listing,
    _print_json,
    console,
    main,
    say,
    services,
    tables,
)


@main.command()
# A plain string: the service layer checks the path itself, so that a directory or a
# missing file is an ``Error:`` line like every other bad submission (click's own path
# check exits with status 2 and a usage block).
@click.argument("weights")
@click.option(
    "--arch", help="Architecture name (see `gauntlet list archs`); not needed for an .onnx file."
)
@click.option("--dataset", required=True, help="Dataset name (see `gauntlet list datasets`).")
@click.option("--card", help="Model card, YAML or JSON with RobustBench's fields.")
@click.option("--suite", default="quick", show_default=True, help="Evaluation suite.")
@click.option("--name", help="Display name (default: the file name).")
@click.option("--n", type=int, help="Evaluation points (default: the suite's).")
@click.option("--mean", help="Per-channel mean, comma separated (default: the dataset's).")
@click.option("--std", help="Per-channel std, comma separated (default: the dataset's).")
@click.option("--num-classes", type=int, help="Classes (default: the dataset's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def submit(ctx, weights, mean, std, num_classes, card, as_json, **options):
    """Submit a safetensors (or ONNX) model and enqueue its suite's evaluations."""
    from gauntlet.scheduler.cards import load_card
    from gauntlet.scheduler.intake import comma_floats
    from gauntlet.workers.onnx_models import is_onnx

    if options["arch"] is None and not is_onnx(weights, None):
        raise GauntletError("Missing option '--arch' (only an .onnx file needs none)")
    options["card"] = None if card is None else load_card(card)

    overrides = {
        "mean": comma_floats(mean, "--mean"),
        "std": comma_floats(std, "--std"),
        "num_classes": num_classes,
    }
    # ``options``: arch, dataset, suite, name and n, passed through as they are.
    report = services(ctx).submit_model(weights, input_overrides=overrides, **options)
    if as_json:
        _print_json(asdict(report))
        return
    state = "new model" if report.new_model else "known model"
    say(
        f"{report.name} ({state} {report.model_id[:12]}): {report.jobs} evaluations, "
        f"{report.new_jobs} new, {report.enqueued} enqueued"
    )


@main.command()
@click.option("--status", type=click.Choice(["queued", "running", "done", "failed"]))
@click.option("--model", help="Model name or id prefix.")
@click.option("--dataset")
@click.option("--limit", type=int, default=200, show_default=True)
@click.option("--watch", is_flag=True, help="Refresh until no job is queued or running.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes of --watch.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def jobs(ctx, status, model, dataset, limit, watch, interval, as_json):
    """List jobs and their status (with --watch, until none is queued or running)."""

    filters = {"status": status, "model": model, "dataset": dataset, "limit": limit}
    if watch:
        from gauntlet.scheduler.cli.operator import watch_jobs

        watch_jobs(ctx, filters, interval, as_json)
        return
    rows = services(ctx).list_jobs(**filters)
    _listing(rows, as_json, tables.jobs_table)


@main.command()
@click.argument("model")
@click.option(
    "--method",
    required=True,
    type=click.Choice(["fgsm-at", "pgd-at", "ensemble-at", "distillation", "prn"]),
)
@click.option("--static", "static", multiple=True, help="ensemble-at: a pre-trained model.")
@click.option("--eps", type=float, help="Adversarial training budget (Linf).")
@click.option("--epochs", type=int)
@click.option("--temperature", type=float, help="Distillation temperature (default 100).")
@click.option("--suite", default="quick", show_default=True, help="Suite for the derived model.")
@click.option("--num-gpus", type=float, default=0.0, show_default=True)
@click.pass_context
def train(ctx, model, method, eps, epochs, temperature, suite, num_gpus, static):
    """Train a defended model from MODEL (a name or id prefix) as a job; it is then evaluated."""
    from gauntlet.scheduler import service

    options = {"eps": eps, "epochs": epochs, "temperature": temperature, "suite": suite}
    params = {k: v for k, v in options.items() if v is not None}
    job_id, new = service.request_training(
        _app(ctx), model, method, params, static=static, num_gpus=num_gpus
    )
    console.print(f"train job {job_id} queued" if new else "this training was already requested")


def _settings(pairs: tuple[str, ...]) -> dict:
    """``--set key=value`` pairs, each value parsed as JSON (a bare word stays a string)."""
    settings = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise GauntletError(f"Expected --set KEY=VALUE, but got {pair!r}")
        try:
            settings[key] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key] = raw
    return settings


def _set_and_n(command):
    """The ``--set KEY=VALUE`` and ``-n`` options every requested job kind takes."""
    command = click.option(
        "-n", "n", type=int, default=200, show_default=True, help="Test points scored."
    )(command)
    return click.option(
        "--set", "pairs", multiple=True, help="Another setting, KEY=VALUE (repeatable)."
    )(command)


def _request(ctx, model, kind, method, options, pairs, **resources) -> None:
    """Queue one job of ``kind``: the options given (None means unset) plus --set pairs."""
    from gauntlet.scheduler import service

    params = {k: v for k, v in options.items() if v is not None} | _settings(pairs)
    job_id, new = service.request_job(_app(ctx), model, kind, method, params, **resources)
    console.print(f"{kind} job {job_id} queued" if new else "this job was already requested")


@main.command()
@click.argument("model")
@click.option(
    "--defense",
    default="none",
    show_default=True,
    type=click.Choice(["none", "transfer", "distillation", "finetune"]),
)
@click.option("--trigger", type=click.Choice(["pixel", "pattern", "square", "blend"]))
@click.option("--poison-rate", type=float, help="Share of the training set poisoned (0.1).")
@click.option("--mode", type=click.Choice(["all-to-one", "all-to-all"]))
@click.option("--target", type=int, help="All-to-one target class (0).")
@_set_and_n
@click.option("--num-gpus", type=float, default=0.0, show_default=True)
@click.pass_context
def backdoor(ctx, model, defense, trigger, poison_rate, mode, target, pairs, n, num_gpus):
    """Plant a BadNets backdoor in MODEL's architecture and measure a defense against it."""
    options = {"trigger": trigger, "poison_rate": poison_rate, "mode": mode, "target": target}
    _request(ctx, model, "backdoor", defense, options, pairs, n=n, num_gpus=num_gpus)


@main.command()
@click.argument("model")
@click.option(
    "--aggregator",
    default="gnmax",
    show_default=True,
    type=click.Choice(["lnmax", "gnmax", "confident-gnmax"]),
)
@click.option("--teachers", type=int, help="Teachers on disjoint partitions (10).")
@click.option("--backdoored-teachers", type=int, help="Teachers given a backdoor (0).")
@click.option("--teacher-gpus", type=float, help="GPUs per teacher task; fractions share one.")
@click.option("--no-noise", is_flag=True, help="Plain plurality vote (no privacy).")
@_set_and_n
@click.pass_context
def pate(ctx, model, aggregator, teachers, backdoored_teachers, teacher_gpus, no_noise, pairs, n):
    """Train PATE teachers (parallel Ray tasks) and a student for MODEL's architecture."""
    options = {
        "teachers": teachers,
        "backdoored_teachers": backdoored_teachers,
        "teacher_gpus": teacher_gpus,
        "noise": False if no_noise else None,
    }
    _request(ctx, model, "pate", aggregator, options, pairs, n=n)


def _default_eps(ctx, ref: str) -> float:
    """The quick suite's Linf budget for the model's dataset: what its FGSM/PGD used."""
    from gauntlet.scheduler.suites import load_suite
    from gauntlet.scheduler.train import find_model

    return load_suite("quick").budget("linf", find_model(_app(ctx).engine, ref)["dataset"])


# Explanation methods: LIME on superpixels, plain-gradient saliency, integrated gradients.
_METHODS = click.Choice(["lime", "saliency", "ig"])


@main.command()
@click.argument("model")
@click.option("--n", "n", type=int, default=8, show_default=True, help="Test points explained.")
@click.option("--method", "methods", type=_METHODS, multiple=True, help="Repeatable (default all).")
@click.option("--attack", default="fgsm", show_default=True, type=click.Choice(["fgsm", "pgd"]))
@click.option("--eps", type=float, help="Linf budget (default: the quick suite's for the dataset).")
@click.option("--set", "pairs", multiple=True, help="Another setting, KEY=VALUE (repeatable).")
@click.option("--num-gpus", type=float, default=0.0, show_default=True)
@click.pass_context
def explain(ctx, model, n, methods, attack, eps, pairs, num_gpus):
    """Attribution maps (LIME, saliency, IG) of MODEL on clean and adversarial test points."""
    eps = _default_eps(ctx, model) if eps is None else eps
    options = {"methods": list(methods) or None, "eps": eps}
    _request(ctx, model, "explain", attack, options, pairs, n=n, num_gpus=num_gpus)


@main.command()
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def subtasks(ctx, job_id, as_json):
    """Where and when the pieces of a job (PATE teachers) ran."""
    from gauntlet.scheduler import service

    rows = service.subtasks(_app(ctx), job_id)
    if rows or as_json:
        _listing(rows, as_json, tables.subtasks_table)
    else:
        console.print(f"Job {job_id} recorded no sub-tasks.")
