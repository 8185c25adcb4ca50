"""Settings shared by the backdoor tests: the digits input spec, target class, seed,
training recipe and the trigger most of them plant."""

from gauntlet.workers.backdoor import SquareTrigger
from gauntlet.workers.models import InputSpec

SPEC = InputSpec(1, 8, 8, 10)
TARGET = 0
SEED = 0
TRAIN = {"arch": "small-cnn", "epochs": 10, "lr": 3e-3, "batch_size": 64, "seed": SEED}
SQUARE = SquareTrigger()  # 2x2 white square in the bottom-right corner
