"""Backdoor attacks (BadNets, Gu et al. 2017) and the defenses measured against them.

- ``triggers``: what is stamped (pixel, pattern, square, blend), from JSON params;
- ``poison``: which training images are stamped and relabelled (all-to-one, all-to-all);
- ``training``: training on poisoned data (the loop is ``workers.training.fit``);
- ``metrics``: clean accuracy, attack success rate, triggered accuracy;
- ``data``: target tasks for transfer learning and the defender's clean split;
- ``transfer_learning``: transfer learning from a backdoored model, and backdoor amplification;
- ``distillation``: distillation-based forgetting (Yoshida & Fujino 2020);
- ``finetune``: fine-tuning on a small clean split, the baseline defense.
"""

from gauntlet.workers.backdoor.data import clean_subset, label_split, shift_domain
from gauntlet.workers.backdoor.distillation import distill
from gauntlet.workers.backdoor.finetune import fine_tune
from gauntlet.workers.backdoor.metrics import backdoor_metrics, predict, trigger_drop_metrics
from gauntlet.workers.backdoor.poison import MODES, PoisonedData, backdoor_labels, poison_dataset
from gauntlet.workers.backdoor.training import train_backdoored
from gauntlet.workers.backdoor.transfer_learning import (
    amplify_backdoor,
    backdoor_neurons,
    penultimate_features,
    transfer_learn,
)
from gauntlet.workers.backdoor.triggers import (
    TRIGGERS,
    BlendTrigger,
    PatternTrigger,
    PixelTrigger,
    SquareTrigger,
    Trigger,
    build_trigger,
)

__all__ = [
    "MODES",
    "TRIGGERS",
    "BlendTrigger",
    "PatternTrigger",
    "PixelTrigger",
    "PoisonedData",
    "SquareTrigger",
    "Trigger",
    "amplify_backdoor",
    "backdoor_labels",
    "backdoor_metrics",
    "backdoor_neurons",
    "build_trigger",
    "clean_subset",
    "distill",
    "fine_tune",
    "label_split",
    "penultimate_features",
    "poison_dataset",
    "predict",
    "shift_domain",
    "train_backdoored",
    "transfer_learn",
    "trigger_drop_metrics",
]
