"""The one place where the project's DpEvents are built.

Calibration, the live ledger and any report all build events through these functions,
so the mechanism that is calibrated is the mechanism that is charged.
"""

from __future__ import annotations

import dp_accounting as dpa


def dp_sgd_steps(sampling_probability: float, noise_multiplier: float,
                 steps: int) -> dpa.DpEvent:
    """`steps` DP-SGD steps of one client (sample-level DP).

    Unit of privacy: one record of that client; neighbouring datasets differ by adding or
    removing one record. Each step Poisson-samples every record independently with
    probability `sampling_probability`, clips each per-sample gradient to norm C (the
    sensitivity of the sum), and adds N(0, (noise_multiplier * C)^2) to every coordinate
    of the sum, also when the sampled batch is empty. Sampling without Poisson, a
    parameter trained without clipping or noise, or noise smaller than stated voids
    the guarantee.
    """
    if not 0.0 < sampling_probability <= 1.0:
        raise ValueError(f"sampling probability must be in (0, 1], got {sampling_probability}")
    if noise_multiplier <= 0.0:
        raise ValueError(f"noise multiplier must be > 0 for a DP step, got {noise_multiplier}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    step = dpa.PoissonSampledDpEvent(sampling_probability,
                                     dpa.GaussianDpEvent(noise_multiplier))
    return dpa.SelfComposedDpEvent(step, steps)
