"""Privacy plans: delta and noise per mechanism, fixed before the first round."""

from __future__ import annotations

from dataclasses import dataclass

from fed_dplora.privacy.calibrate import calibrate_dp_fedavg_noise, calibrate_dp_sgd_noise
import dp_accounting as dpa

from fed_dplora.privacy.events import (ClientSampling, dp_fedavg_round, dp_sgd_step,
                                       sampling_probability)


class PrivacyPlanError(ValueError):
    """The requested budget cannot be met as configured."""


@dataclass(frozen=True)
class SampleLevelPlan:
    """Per client: q_k = batch / n_k and sigma_k such that client k stays within
    (target_epsilon, delta) after every planned step, even if selected every round
    (unless sigma was set by hand: then the budget check stops the run instead)."""

    target_epsilon: float
    delta: float
    sampling_probability: dict[str, float]
    noise_multiplier: dict[str, float]

    def step_event(self, client: str) -> dpa.DpEvent:
        """One DP-SGD step of `client`: what its ledger account is charged per step."""
        return dp_sgd_step(self.sampling_probability[client], self.noise_multiplier[client])


@dataclass(frozen=True)
class ClientLevelPlan:
    """DP-FedAvg: clip norm S, noise multiplier z, m expected of N clients per round."""

    target_epsilon: float
    delta: float
    sampling: ClientSampling
    num_clients: int
    expected_clients: int
    clip_norm: float
    noise_multiplier: float

    @property
    def round_event(self) -> dpa.DpEvent:
        """One DP-FedAvg round: what the federation's account is charged per round."""
        return dp_fedavg_round(self.sampling, self.num_clients, self.expected_clients,
                               self.noise_multiplier)

    @property
    def noise_std(self) -> float:
        """Standard deviation per coordinate of the noise on the mean: z S / m."""
        return self.noise_multiplier * self.clip_norm / self.expected_clients


MAX_AUTO_DELTA = 1e-5


def auto_delta(sizes: list[int]) -> float:
    """min(1e-5, 1 / (10 * largest unit count)).

    delta bounds the probability that the guarantee fails outright: a mechanism that
    publishes one random unit (record, or client) whole is (0, 1/n)-DP, so delta must sit
    well below 1/n for every population. 1/(10 n) alone is weak where n is small (two
    hospitals: 0.05 at client level; 1,600 records: 6e-5), hence the cap at 1e-5, the
    usual value in the DP-SGD literature."""
    return min(MAX_AUTO_DELTA, 1.0 / (10 * max(sizes)))


def plan_sample_level(target_epsilon: float, delta: float | None, batch_size: int,
                      client_sizes: dict[str, int], planned_steps: int,
                      noise_multiplier: float | None = None) -> SampleLevelPlan:
    if not client_sizes:
        raise PrivacyPlanError("no clients to plan for")
    delta = auto_delta(list(client_sizes.values())) if delta is None else delta
    too_small = {c: n for c, n in client_sizes.items() if delta >= 1.0 / n}
    if too_small:
        raise PrivacyPlanError(
            f"privacy.delta={delta:g} is not below 1/n for client(s) {too_small}: a delta "
            "that large allows releasing a record outright. Use a smaller delta, or "
            "\"auto\" (min(1e-5, 1 / (10 * largest n))).")
    q = {c: sampling_probability(batch_size, n) for c, n in client_sizes.items()}
    if noise_multiplier is not None:
        return SampleLevelPlan(target_epsilon, delta, q, {c: noise_multiplier for c in q})
    sigma_by_q = {qk: calibrate_dp_sgd_noise(target_epsilon, delta, qk, planned_steps)
                  for qk in sorted(set(q.values()))}
    return SampleLevelPlan(target_epsilon, delta, q, {c: sigma_by_q[qk] for c, qk in q.items()})


def plan_client_level(target_epsilon: float, delta: float | None, sampling: ClientSampling,
                      num_clients: int, expected_clients: int, planned_rounds: int,
                      clip_norm: float, noise_multiplier: float | None = None
                      ) -> ClientLevelPlan:
    if not 0 < expected_clients <= num_clients:
        raise PrivacyPlanError(f"clients-per-round={expected_clients} must be between 1 "
                               f"and the number of clients, {num_clients}")
    delta = auto_delta([num_clients]) if delta is None else delta
    if delta >= 1.0 / num_clients:
        raise PrivacyPlanError(
            f"privacy.client-delta={delta:g} is not below 1/{num_clients} (one over the "
            "number of clients): a delta that large allows releasing a client's data "
            "outright. Use a smaller delta, or \"auto\" (min(1e-5, 1 / (10 * clients))).")
    if noise_multiplier is None:
        noise_multiplier = calibrate_dp_fedavg_noise(
            target_epsilon, delta, sampling, num_clients, expected_clients, planned_rounds)
    return ClientLevelPlan(target_epsilon, delta, sampling, num_clients, expected_clients,
                           clip_norm, noise_multiplier)


@dataclass(frozen=True)
class PrivacyPlan:
    """Everything fixed before round 1: which levels run, with what noise."""

    sample: SampleLevelPlan | None
    client: ClientLevelPlan | None

    @property
    def enabled(self) -> bool:
        return self.sample is not None or self.client is not None
