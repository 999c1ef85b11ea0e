"""Noise calibration from a target (epsilon, delta), through the ledger's own events."""

from __future__ import annotations

import dp_accounting as dpa

from fed_dplora.privacy.accountants import make_rdp_accountant
from fed_dplora.privacy.events import dp_sgd_steps


def calibrate_dp_sgd_noise(target_epsilon: float, delta: float,
                           sampling_probability: float, steps: int) -> float:
    """Smallest noise multiplier whose `steps` DP-SGD steps spend <= target_epsilon.

    Uses the same event builder and accountant as the live ledger, so a client that takes
    exactly `steps` steps ends within its target.
    """
    if target_epsilon <= 0 or not 0 < delta < 1:
        raise ValueError(f"need target_epsilon > 0 and delta in (0, 1), got "
                         f"{target_epsilon}, {delta}")
    return float(dpa.calibrate_dp_mechanism(
        make_rdp_accountant,
        lambda sigma: dp_sgd_steps(sampling_probability, sigma, steps),
        target_epsilon,
        delta,
        bracket_interval=dpa.LowerEndpointAndGuess(0.05, 1.0),
        tol=1e-4,
    ))
