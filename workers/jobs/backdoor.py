"""The ``backdoor`` job kind: plant a BadNets backdoor, apply one defense, measure both models.

``spec["attack"]`` names the defense, ``params`` the trigger, the poisoning and the
defense's settings (``check_backdoor``):

- ``none``: the backdoored model as is;
- ``transfer``: the backdoored model is the source of transfer learning (Gu et al.
  2017) to a shifted domain with the same labels (``task: shift``) or to other classes
  (``task: split``: classes 0-4 -> 5-9, a new head), with frozen features or full
  fine-tuning, optionally after amplifying the backdoor neurons by ``amplify``;
- ``distillation``: a fresh student learns the backdoored teacher's softened outputs on
  pristine training images (Yoshida & Fujino 2020), or on images of which
  ``triggered_fraction`` carry the trigger;
- ``finetune``: all layers fine-tuned on a clean 5% of the training split, the baseline.

The backdoored model starts from the submitted model's weights (``init: model``) or from
a fresh network of its architecture (``init: scratch``). A reference model trained the
same way without poison gives the clean-accuracy baseline and the ASR a trigger has on
a model that never saw it. Every number is measured on the job's evaluation subset.
"""

from __future__ import annotations

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.backdoor import (
    MODES,
    amplify_backdoor,
    backdoor_metrics,
    backdoor_neurons,
    build_trigger,
    clean_subset,
    distill,
    fine_tune,
    label_split,
    predict,
    shift_domain,
    train_backdoored,
    transfer_learn,
    trigger_drop_metrics,
)
from gauntlet.workers.context import JobContext
from gauntlet.workers.hyperparams import expect_bool, expect_float, expect_int
from gauntlet.workers.jobs import HOUR, JobKind, check_procedure, register_kind
from gauntlet.workers.models import InputSpec
from gauntlet.workers.results import JobResult, Metric

METHODS = ("none", "transfer", "distillation", "finetune")
_COMMON = {"trigger", "trigger_params", "mode", "target", "poison_rate", "init", "epochs", "lr"}
_COMMON |= {"batch_size", "reference"}
_BY_METHOD = {
    "none": set(),
    "transfer": {"task", "freeze", "amplify", "amplify_units", "defense_epochs", "defense_lr"},
    "distillation": {"temperature", "triggered_fraction", "defense_epochs", "defense_lr"},
    "finetune": {"fraction", "defense_epochs", "defense_lr"},
}
SPLIT_SOURCE, SPLIT_TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
# (learning rate, epochs) of each defense's training, unless the job sets them.
_DEFENSE_DEFAULTS = {"transfer": (1e-2, 10), "distillation": (1e-3, 10), "finetune": (1e-2, 20)}


def check_backdoor(method: str, params: dict) -> dict:
    """Validated settings with defaults; GauntletError on anything unknown or out of range."""
    accepted = _COMMON | _BY_METHOD.get(method, set())
    check_procedure(
        method,
        METHODS,
        params,
        accepted,
        what="backdoor defense",
        params_what=f"parameter(s) for backdoor defense {method!r}:",
    )
    trigger, trigger_params = params.get("trigger", "square"), params.get("trigger_params") or {}
    build_trigger(trigger, trigger_params)  # validates both
    mode = params.get("mode", "all-to-one")
    if mode not in MODES:
        raise GauntletError(f"Expected `mode` to be one of {', '.join(MODES)}, but got {mode!r}")
    init = params.get("init", "scratch")
    if init not in ("scratch", "model"):
        raise GauntletError(f"Expected `init` to be scratch or model, but got {init!r}")
    settings = {
        "trigger": trigger,
        "trigger_params": dict(trigger_params),
        "mode": mode,
        "target": None
        if mode == "all-to-all"
        else expect_int("target", params.get("target", 0), 0),
        "poison_rate": expect_float("poison_rate", params.get("poison_rate", 0.1), 0.0, 1.0),
        "init": init,
        "epochs": expect_int("epochs", params.get("epochs", 10), 1, 10_000),
        "lr": expect_float("lr", params.get("lr", 3e-3), 0.0, 1.0),
        "batch_size": expect_int("batch_size", params.get("batch_size", 64), 1, 100_000),
        "reference": expect_bool("reference", params.get("reference", True)),
    }
    if method == "transfer":
        task = params.get("task", "shift")
        if task not in ("shift", "split"):
            raise GauntletError(f"Expected `task` to be shift or split, but got {task!r}")
        settings["task"] = task
        settings["freeze"] = expect_bool("freeze", params.get("freeze", True))
        settings["amplify"] = expect_float("amplify", params.get("amplify", 1.0), 0.0, 1000.0)
        settings["amplify_units"] = expect_int(
            "amplify_units", params.get("amplify_units", 8), 1, 100_000
        )
        if task == "split" and mode == "all-to-all":
            raise GauntletError("the split transfer task needs an all-to-one backdoor")
        if task == "split" and settings["target"] not in SPLIT_SOURCE:
            raise GauntletError("the split task's source classes are 0-4; `target` must be one")
    if method == "distillation":
        settings["temperature"] = expect_float(
            "temperature", params.get("temperature", 1.0), 0.0, 1e4
        )
        fraction = params.get("triggered_fraction", 0.0)
        settings["triggered_fraction"] = (
            0.0 if fraction == 0 else expect_float("triggered_fraction", fraction, 0.0, 1.0)
        )
    if method == "finetune":
        settings["fraction"] = expect_float("fraction", params.get("fraction", 0.05), 0.0, 1.0)
    if method != "none":
        # Defaults measured on digits (seeds 0-6): a retrained last layer needs a larger
        # step than full fine-tuning; fine-tuning on 5% of the data needs more epochs.
        lr, epochs = _DEFENSE_DEFAULTS[method]
        if method == "transfer" and not settings["freeze"]:
            lr = 3e-3
        settings["defense_lr"] = expect_float("defense_lr", params.get("defense_lr", lr), 0.0, 1.0)
        settings["defense_epochs"] = expect_int(
            "defense_epochs", params.get("defense_epochs", epochs), 1, 10_000
        )
    return settings


def _prefixed(prefix: str, metrics: list[Metric]) -> list[Metric]:
    return [Metric(prefix + m.name, m.value, m.n, m.low, m.high) for m in metrics]


def run(ctx: JobContext) -> JobResult:
    """Defended correct, and defended correct under the trigger, are the job's outcomes."""
    spec, model, net, progress = ctx.spec, ctx.model, ctx.net, ctx.progress
    x_eval, y_eval, _ = ctx.eval_data
    method = spec["attack"]
    s = check_backdoor(method, spec.get("params") or {})
    seed = int(spec["seed"])
    input_spec = InputSpec.from_dict(model["input_spec"])
    trigger = build_trigger(s["trigger"], s["trigger_params"])
    x_train, y_train = ctx.train_split()
    split = method == "transfer" and s["task"] == "split"
    if split and s["init"] == "model":
        raise GauntletError("the split transfer task trains a 5-class source; use init: scratch")
    if split:
        (x_train, y_train), (x_new, y_new) = label_split(x_train, y_train)
        (x_eval, y_eval), (x_eval_new, y_eval_new) = label_split(x_eval, y_eval)
        input_spec = InputSpec(
            input_spec.channels, input_spec.height, input_spec.width, len(SPLIT_SOURCE)
        )
    if s["target"] is not None and s["target"] >= input_spec.num_classes:
        raise GauntletError(f"`target` {s['target']} is not one of the model's classes")
    steps = 2 + int(s["reference"])
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, steps)

    def train(rate: float):
        start = (
            {"model": net} if s["init"] == "model" else {"arch": model["arch"], "spec": input_spec}
        )
        trained, _ = train_backdoored(
            x_train,
            y_train,
            trigger,
            rate=rate,
            mode=s["mode"],
            target=s["target"],
            epochs=s["epochs"],
            lr=s["lr"],
            batch_size=s["batch_size"],
            seed=seed,
            **start,
        )
        return trained

    measure = dict(trigger=trigger, target=s["target"], mode=s["mode"])
    backdoored = train(s["poison_rate"])
    step()
    metrics = _prefixed("backdoored_", backdoor_metrics(backdoored, x_eval, y_eval, **measure))
    if s["reference"]:
        reference = train(0.0)
        step()
        metrics += _prefixed("clean_model_", backdoor_metrics(reference, x_eval, y_eval, **measure))

    common = dict(epochs=s.get("defense_epochs", 1), lr=s.get("defense_lr", s["lr"]), seed=seed)
    details: dict = {"method": method, "settings": s}
    if method == "none":
        defended = backdoored
    elif method == "finetune":
        xs, ys = clean_subset(x_train, y_train, s["fraction"], seed)
        details["clean_images"] = len(ys)
        defended = fine_tune(backdoored, xs, ys, **common)
    elif method == "distillation":
        defended = distill(
            backdoored,
            x_train,
            arch=model["arch"],
            spec=input_spec,
            temperature=s["temperature"],
            trigger=trigger if s["triggered_fraction"] else None,
            trigger_fraction=s["triggered_fraction"],
            batch_size=s["batch_size"],
            **common,
        )
    else:
        source = backdoored
        if s["amplify"] != 1.0:
            probe = x_train[: min(256, len(x_train))]
            neurons = backdoor_neurons(source, probe, trigger, count=s["amplify_units"])
            source = amplify_backdoor(source, neurons, s["amplify"], probe)
            details["amplified_neurons"] = len(neurons)
        if split:
            # A new head for the new classes; scored on them from here on.
            x_tune, y_tune, x_eval, y_eval = x_new, y_new, x_eval_new, y_eval_new
        else:
            # The same labels on a shifted domain: the trigger is stamped after the shift.
            x_tune, y_tune, x_eval = shift_domain(x_train), y_train, shift_domain(x_eval)
        defended = transfer_learn(
            source,
            x_tune,
            y_tune,
            new_head=split,
            num_classes=len(SPLIT_TARGET) if split else None,
            freeze_features=s["freeze"],
            batch_size=s["batch_size"],
            **common,
        )
    step()
    if split:
        # The new task has no target class: what survives is the trigger's damage.
        metrics += trigger_drop_metrics(defended, x_eval, y_eval, trigger)
    else:
        metrics += backdoor_metrics(defended, x_eval, y_eval, **measure)
    correct = predict(defended, x_eval) == y_eval
    kept = predict(defended, trigger.stamp(x_eval)) == y_eval
    return ctx.result(metrics, correct, correct & kept, details)


# Trains up to three networks (backdoored, reference, defended) on the full split.
register_kind(
    JobKind("backdoor", run, board="backdoor", check=check_backdoor, time_limit_s=12 * HOUR)
)
