"""Calibration: the metrics (ECE, MCE, Brier, NLL, temperature scaling) and the
reliability diagram drawn from the same bins."""
