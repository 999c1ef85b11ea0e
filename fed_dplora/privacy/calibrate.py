"""Noise calibration from a target (epsilon, delta), through the ledgers' own events.

Each calibration is a pure function of its arguments and costs up to seconds (a bisection
over dp-accounting compositions), so its result is cached for the process: a resumed or
repeated run with the same plan calibrates once."""

from __future__ import annotations

import functools
from collections.abc import Callable

import dp_accounting as dpa

from fed_dplora.privacy.accountants import make_rdp_accountant
from fed_dplora.privacy.events import (SAMPLE_LEVEL_RELATION, ClientSampling, NeighborRel,
                                       client_level_relation, dp_fedavg_round, dp_sgd_steps)


def calibrate_noise(event_for: Callable[[float], dpa.DpEvent], relation: NeighborRel,
                    target_epsilon: float, delta: float) -> float:
    """Smallest noise multiplier whose event spends <= target_epsilon at `delta` (RDP)."""
    if target_epsilon <= 0 or not 0 < delta < 1:
        raise ValueError(f"need target_epsilon > 0 and delta in (0, 1), got "
                         f"{target_epsilon}, {delta}")
    return float(dpa.calibrate_dp_mechanism(
        lambda: make_rdp_accountant(relation), event_for, target_epsilon, delta,
        bracket_interval=dpa.LowerEndpointAndGuess(0.05, 1.0), tol=1e-4))


@functools.lru_cache(maxsize=256)
def calibrate_dp_sgd_noise(target_epsilon: float, delta: float,
                           sampling_probability: float, steps: int) -> float:
    """Sigma such that `steps` DP-SGD steps stay within the target.

    Same event builder and accountant as the live ledger, so a client that takes
    exactly `steps` steps ends within its target.
    """
    return calibrate_noise(lambda sigma: dp_sgd_steps(sampling_probability, sigma, steps),
                           SAMPLE_LEVEL_RELATION, target_epsilon, delta)


@functools.lru_cache(maxsize=256)
def calibrate_dp_fedavg_noise(target_epsilon: float, delta: float,
                              sampling: ClientSampling, num_clients: int,
                              expected_clients: int, rounds: int) -> float:
    """z such that `rounds` DP-FedAvg rounds stay within the client-level target."""
    return calibrate_noise(
        lambda z: dpa.SelfComposedDpEvent(
            dp_fedavg_round(sampling, num_clients, expected_clients, z), rounds),
        client_level_relation(sampling), target_epsilon, delta)
