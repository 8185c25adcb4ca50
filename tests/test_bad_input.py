"""Bad input never produces a traceback: one ``Error:`` line, exit status 1.

Every case goes through the real CLI (click's runner) on the embedded services, as a
user would meet it: hostile or careless weights files, suite files with wrong types,
bad options, names that do not fit, and caps set through the environment.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from gauntlet.scheduler.cli import main
from gauntlet.workers.architectures import build_architecture
from gauntlet.workers.models import InputSpec, load_classifier

DIGITS = InputSpec(1, 8, 8, 10)


@pytest.fixture
def run(tmp_path):
    runner = CliRunner()
    base = {"GAUNTLET_HOME": str(tmp_path / "home")}

    def invoke(*args, env=None):
        return runner.invoke(main, list(map(str, args)), env={**base, **(env or {})})

    return invoke


def _weights(path, dtype=torch.float32):
    """An untrained small CNN for digits, saved as ``dtype``: the checks never train."""
    torch.manual_seed(0)
    state = build_architecture("small-cnn", DIGITS).state_dict()
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture
def weights(tmp_path):
    return _weights(tmp_path / "model.safetensors")


def submit(run, weights, *options, env=None):
    args = ["submit", weights, "--arch", "small-cnn", "--dataset", "digits", "--n", 20]
    return run(*args, *options, env=env)


def one_line_error(result, *fragments: str) -> str:
    """The exact contract: status 1, one line, starting with Error:, naming the field."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _deep_header(path, depth=100_000):
    header = b'{"w":' + b"[" * depth + b"]" * depth + b"}"
    path.write_bytes(struct.pack("<Q", len(header)) + header)


# --- weights files -------------------------------------------------------------------


def test_a_deeply_nested_header_is_refused(run, tmp_path):
    _deep_header(tmp_path / "deep.safetensors")
    one_line_error(submit(run, tmp_path / "deep.safetensors"), "nests too deeply")
    assert json.loads(run("list", "models", "--json").output) == []


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda p: p.mkdir(), ("is a directory",)),
        (lambda p: None, ("does not exist",)),
        (lambda p: _weights(p, torch.int8), ("int8", "integer")),
        (lambda p: _weights(p, torch.uint8), ("uint8", "integer")),
    ],
    ids=["directory", "missing", "int8", "uint8"],
)
def test_unusable_weights_files_are_one_error_line(run, tmp_path, make, fragments):
    path = tmp_path / "w.safetensors"
    make(path)
    one_line_error(submit(run, path), *fragments)


@pytest.mark.parametrize(
    "dtype, name",
    [(torch.float16, "float16"), (torch.bfloat16, "bfloat16"), (torch.float64, "float64")],
)
def test_other_float_weights_are_converted_with_a_note(run, tmp_path, dtype, name):
    path = _weights(tmp_path / f"{name}.safetensors", dtype)
    result = submit(run, path, "--json")
    assert result.exit_code == 0, result.output
    (model,) = json.loads(run("list", "models", "--json").output)
    assert model["note"] == f"weights converted from {name} to float32"
    net = load_classifier(path, "small-cnn", DIGITS)
    assert {p.dtype for p in net.parameters()} == {torch.float32}


def test_float32_weights_get_no_note(run, weights):
    assert submit(run, weights).exit_code == 0
    (model,) = json.loads(run("list", "models", "--json").output)
    assert model["note"] is None


# --- caps --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, options, fragments",
    [
        ({"GAUNTLET_MAX_WEIGHTS_BYTES": "1000"}, (), ("GAUNTLET_MAX_WEIGHTS_BYTES", "bytes")),
        ({}, ("--arch", "wrn-100000-1"), ("wrn-100000-1", "GAUNTLET_MAX_PARAMETERS")),
        ({"GAUNTLET_MAX_PARAMETERS": "1000"}, (), ("small-cnn", "GAUNTLET_MAX_PARAMETERS")),
        ({"GAUNTLET_MAX_JOB_WORK": "100"}, (), ("'pgd'", "GAUNTLET_MAX_JOB_WORK", "quick")),
        ({"GAUNTLET_MAX_JOB_WORK": "lots"}, (), ("GAUNTLET_MAX_JOB_WORK", "'lots'")),
    ],
    ids=["file-size", "wrn-size", "parameters", "work", "bad-setting"],
)
def test_caps_refuse_before_storing(run, weights, env, options, fragments):
    one_line_error(submit(run, weights, *options, env=env), *fragments)
    assert json.loads(run("list", "models", "--json").output) == []


def test_every_shipped_suite_is_under_the_default_caps():
    from gauntlet.cluster.settings import Settings
    from gauntlet.scheduler.intake import check_work
    from gauntlet.scheduler.suites import suite_names

    limit = Settings.from_env({}).max_job_work
    for suite in suite_names():
        for dataset in ("digits", "mnist", "cifar10", "cifar100"):
            check_work(suite, dataset, None, limit)


def test_pate_teachers_are_capped(run, weights):
    assert submit(run, weights, "--name", "m").exit_code == 0
    env = {"GAUNTLET_MAX_PATE_TEACHERS": "4"}
    one_line_error(
        run("pate", "m", "--teachers", 5, env=env), "`teachers`", "GAUNTLET_MAX_PATE_TEACHERS"
    )
    one_line_error(run("pate", "m", "--set", "teachers=lots"), "`teachers`", "'lots'")


# --- suite files -------------------------------------------------------------------

_EPS = "eps: {linf: {default: 0.1}}\n"
_PGD = "evaluations:\n  - {attack: pgd, norm: linf}\n"


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("n: lots\n" + _EPS + _PGD, ("`n`", "'lots'")),
        ("seed: -1\n" + _EPS + _PGD, ("`seed`",)),
        ("batch_size: big\n" + _EPS + _PGD, ("`batch_size`",)),
        ("resources: {gpus: 1}\n" + _EPS + _PGD, ("`resources`", "gpus")),
        ("resources: {num_gpus: lots}\n" + _EPS + _PGD, ("`num_gpus`",)),
        ("resources: 4\n" + _EPS + _PGD, ("`resources`",)),
        ("eps: {linf: 0.1}\n" + _PGD, ("`eps.linf`",)),
        ("eps: {linf: {default: big}}\n" + _PGD, ("eps.linf.default",)),
        (
            _EPS + "evaluations:\n  - {attack: pgd, eps_sweep: [1, 2]}\n",
            ("evaluation 1 (pgd)", "`eps_sweep`", "`norm`"),
        ),
        (
            _EPS + "evaluations:\n  - {attack: pgd, norm: linf, eps_sweep: 2}\n",
            ("evaluation 1 (pgd)", "`eps_sweep`"),
        ),
        (
            _EPS + "evaluations:\n  - {attack: pgd, norm: linf, eps_sweep: [a]}\n",
            ("evaluation 1 (pgd)", "eps_sweep"),
        ),
        (
            _EPS
            + "defenses: [{name: jpeg}]\n"
            + "evaluations:\n  - {attack: pgd, norm: linf, eot_samples: ten}\n",
            ("evaluation 1 (pgd)", "`eot_samples`", "'ten'"),
        ),
        (
            _EPS
            + "evaluations:\n  - {attack: clean}\n  - {attack: pgd, norm: linf, adaptive: maybe}\n",
            ("evaluation 2 (pgd)", "`adaptive`"),
        ),
        (
            _EPS + "evaluations:\n  - {attack: pgd, norm: linf, params: 5}\n",
            ("evaluation 1 (pgd)", "`params`"),
        ),
        (_EPS + "evaluations:\n  - {attack: pgd, norm: 5}\n", ("evaluation 1 (pgd)", "`norm`")),
        (_EPS + "evaluations:\n  - {attack: [pgd]}\n", ("evaluation 1", "`attack`")),
        (
            _EPS + "evaluations:\n  - {attack: pgd, norm: linf, eps: wide}\n",
            ("evaluation 1 (pgd)", "eps"),
        ),
        (
            _EPS + "evaluations:\n  - {attack: pgd, norm: linf, colour: red}\n",
            ("evaluation 1 (pgd)", "colour"),
        ),
        (_EPS + "evaluations: {attack: pgd}\n", ("`evaluations`",)),
        (_EPS + "defenses: jpeg\n" + _PGD, ("`defenses`",)),
        (_EPS + "defenses: [{name: jpeg, params: high}]\n" + _PGD, ("defense 1", "`params`")),
        (_EPS + "defenses: [{name: 5}]\n" + _PGD, ("defense 1", "`name`")),
        (
            _EPS + "transfer: {attack: pgd, norm: linf, ensemble: often}\n" + _PGD,
            ("transfer", "`ensemble`"),
        ),
        (_EPS + "colour: red\n" + _PGD, ("unknown fields", "colour")),
        ("- just a list\n", ("YAML mapping",)),
        ("n: [unclosed\n", ("not valid YAML",)),
        ("[" * 20000 + "]" * 20000 + "\n", ("suite",)),
    ],
)
def test_bad_suite_files_are_one_error_line(run, weights, tmp_path, text, fragments):
    suite = tmp_path / "mine.yaml"
    suite.write_text(text)
    line = one_line_error(submit(run, weights, "--suite", suite), *fragments)
    assert "'mine'" in line or "mine.yaml" in line
    assert json.loads(run("list", "models", "--json").output) == []


def test_a_binary_suite_file_is_one_error_line(run, weights, tmp_path):
    suite = tmp_path / "binary.yaml"
    suite.write_bytes(b"\xff\xfe\x00garbage")
    one_line_error(submit(run, weights, "--suite", suite), "binary.yaml")


# --- options and names -------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragments",
    [
        (
            ("submit", "{w}", "--arch", "small-cnn", "--dataset", "digits", "--n", "lots"),
            ("--n", "lots"),
        ),
        (("submit", "{w}", "--arch", "small-cnn", "--dataset", "digits", "--n", "0"), ("`--n`",)),
        (("submit", "{w}", "--dataset", "digits"), ("--arch",)),
        (
            ("submit", "{w}", "--arch", "small-cnn", "--dataset", "digits", "--mean", "a,b"),
            ("--mean",),
        ),
        (
            ("submit", "{w}", "--arch", "small-cnn", "--dataset", "digits", "--num-classes", "1"),
            ("num_classes",),
        ),
        (("submit", "{w}", "--arch", "wrn-0016-4", "--dataset", "digits"), ("wrn-0016-4",)),
        (("jobs", "--status", "lost"), ("--status", "lost")),
        (("jobs", "--limit", "many"), ("--limit",)),
        (("pate", "[/]nobody"), ("'[/]nobody'",)),
        (("train", "[red]nobody", "--method", "pgd-at"), ("'[red]nobody'",)),
        (("no-such-command",), ("no-such-command",)),
        (("--no-such-option",), ("--no-such-option",)),
    ],
)
def test_bad_options_are_one_error_line(run, weights, args, fragments):
    result = run(*[str(weights) if a == "{w}" else a for a in args])
    one_line_error(result, *fragments)


@pytest.mark.parametrize(
    "name, fragments",
    [
        ("x" * 201, ("model name", "200 characters")),
        ("two\nlines", ("model name", "printable", "\\n")),
        ("bell\x07", ("model name", "printable")),
        ("tab\tname", ("model name", "printable")),
    ],
    ids=["too-long", "newline", "control", "tab"],
)
def test_names_are_bounded_on_every_database(tmp_path, stack, weights, name, fragments):
    runner = CliRunner()
    env = {"GAUNTLET_HOME": str(tmp_path / "home"), **stack}
    args = ["submit", str(weights), "--arch", "small-cnn", "--dataset", "digits", "--name", name]
    one_line_error(runner.invoke(main, args, env=env), *fragments)
    listed = runner.invoke(main, ["list", "models", "--json"], env=env)
    assert json.loads(listed.output) == []


def test_a_long_file_name_is_refused_as_the_default_name(run, tmp_path):
    path = _weights(tmp_path / ("w" * 210 + ".safetensors"))
    one_line_error(submit(run, path), "model name (the file's name)", "200 characters")
    assert submit(run, path, "--name", "short").exit_code == 0  # a --name fixes it


@pytest.mark.parametrize("name", ["[/]x", "[red]x", "[bold]x[/bold]", "x\\"])
def test_names_print_literally_in_every_table(run, weights, name):
    # A wide terminal, so that the tables show whole names instead of truncating them.
    wide = {"COLUMNS": "300"}
    result = submit(run, weights, "--name", name, env=wide)
    assert result.exit_code == 0 and f"{name} (new model" in result.output, result.output
    for listing in (("list", "models"), ("jobs",)):
        shown = run(*listing, env=wide)
        assert shown.exit_code == 0 and name in shown.output, shown.output
