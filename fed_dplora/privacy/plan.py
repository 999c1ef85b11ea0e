"""Sample-level privacy plan: delta and a calibrated noise multiplier per client."""

from __future__ import annotations

from dataclasses import dataclass

from fed_dplora.privacy.calibrate import calibrate_dp_sgd_noise


class PrivacyPlanError(ValueError):
    """The requested budget cannot be met as configured."""


@dataclass(frozen=True)
class SampleLevelPlan:
    """Per client: q_k = batch / n_k and sigma_k such that client k stays within
    (target_epsilon, delta) after every planned step, even if selected every round."""

    target_epsilon: float
    delta: float
    sampling_probability: dict[str, float]
    noise_multiplier: dict[str, float]


def auto_delta(client_sizes: dict[str, int]) -> float:
    """1 / (10 * largest client dataset): below 1/n_k for every client."""
    return 1.0 / (10 * max(client_sizes.values()))


def plan_sample_level(target_epsilon: float, delta: float | None, batch_size: int,
                      client_sizes: dict[str, int], planned_steps: int) -> SampleLevelPlan:
    if not client_sizes:
        raise PrivacyPlanError("no clients to plan for")
    delta = auto_delta(client_sizes) if delta is None else delta
    too_small = {c: n for c, n in client_sizes.items() if delta >= 1.0 / n}
    if too_small:
        raise PrivacyPlanError(
            f"privacy.delta={delta:g} is not below 1/n for client(s) {too_small}: a delta "
            "that large allows releasing a record outright. Use a smaller delta, or "
            "\"auto\" (1 / (10 * largest n)).")
    q = {c: min(1.0, batch_size / n) for c, n in client_sizes.items()}
    sigma_by_q = {qk: calibrate_dp_sgd_noise(target_epsilon, delta, qk, planned_steps)
                  for qk in sorted(set(q.values()))}
    return SampleLevelPlan(target_epsilon, delta, q, {c: sigma_by_q[qk] for c, qk in q.items()})
