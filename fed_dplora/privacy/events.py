"""The one place where the project's DpEvents are built.

Calibration, the live ledger and the final report all build events through these
functions, so the mechanism that is calibrated is the mechanism that is charged.
"""

from __future__ import annotations

from typing import Literal

import attr
import dp_accounting as dpa

NeighborRel = dpa.privacy_accountant.NeighboringRelation
ClientSampling = Literal["poisson", "fixed"]


def sampling_probability(batch_size: int, num_records: int) -> float:
    """q = expected batch / records (at most 1): the one definition of a client's
    Poisson rate, for calibration (the plan) and for sampling (the DP engine)."""
    if batch_size <= 0 or num_records <= 0:
        raise ValueError(f"need batch size and records > 0, got {batch_size}, {num_records}")
    return min(1.0, batch_size / num_records)


def dp_sgd_step(sampling_probability: float, noise_multiplier: float) -> dpa.DpEvent:
    """One DP-SGD step of one client (sample-level DP).

    Unit of privacy: one record of that client; neighbouring datasets differ by adding or
    removing one record (`SAMPLE_LEVEL_RELATION`). The step Poisson-samples every record
    independently with probability `sampling_probability`, clips each per-sample
    gradient to norm C (the sensitivity of the sum), and adds
    N(0, (noise_multiplier * C)^2) to every coordinate of the sum, also when the
    sampled batch is empty. Sampling without Poisson, sampling the server can observe,
    a parameter trained without clipping or noise, or noise smaller than stated voids
    the guarantee.
    """
    if not 0.0 < sampling_probability <= 1.0:
        raise ValueError(f"sampling probability must be in (0, 1], got {sampling_probability}")
    if noise_multiplier <= 0.0:
        raise ValueError(f"noise multiplier must be > 0 for a DP step, got {noise_multiplier}")
    return dpa.PoissonSampledDpEvent(sampling_probability,
                                     dpa.GaussianDpEvent(noise_multiplier))


def dp_sgd_steps(sampling_probability: float, noise_multiplier: float,
                 steps: int) -> dpa.DpEvent:
    """`steps` DP-SGD steps of one client: `dp_sgd_step` self-composed."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return dpa.SelfComposedDpEvent(dp_sgd_step(sampling_probability, noise_multiplier),
                                   steps)


SAMPLE_LEVEL_RELATION = NeighborRel.ADD_OR_REMOVE_ONE


def dp_fedavg_round(sampling: ClientSampling, num_clients: int, expected_clients: int,
                    noise_multiplier: float) -> dpa.DpEvent:
    """One DP-FedAvg round (client-level DP).

    Unit of privacy: all the data of one client. The server clips each sampled client's
    update (every tensor that travels, as one flat vector) to norm S, sums, adds
    N(0, (noise_multiplier * S)^2) per coordinate (also when no client was sampled) and
    divides by the fixed `expected_clients` m.

    - "poisson": each of the `num_clients` clients takes part independently with
      probability m / num_clients. Neighbouring: add or remove one client, so the sum's
      sensitivity is S and the Gaussian's multiplier is `noise_multiplier`.
    - "fixed": exactly m clients, uniformly without replacement. dp-accounting supports
      this only for replace-one neighbours (the number of clients is public); replacing
      one clipped update moves the sum by up to 2S, so the event's multiplier is
      `noise_multiplier / 2`.

    A client whose update skips the clip, a denominator that depends on who answered,
    or a round released without its noise voids the guarantee.
    """
    if not 0 < expected_clients <= num_clients:
        raise ValueError(f"need 0 < expected clients <= clients, got {expected_clients} "
                         f"of {num_clients}")
    if noise_multiplier <= 0.0:
        raise ValueError(f"noise multiplier must be > 0 for a DP round, got {noise_multiplier}")
    if sampling == "poisson":
        return dpa.PoissonSampledDpEvent(expected_clients / num_clients,
                                         dpa.GaussianDpEvent(noise_multiplier))
    if sampling == "fixed":
        return dpa.SampledWithoutReplacementDpEvent(
            num_clients, expected_clients, dpa.GaussianDpEvent(noise_multiplier / 2))
    raise ValueError(f"client sampling must be \"poisson\" or \"fixed\", got {sampling!r}")


def client_level_relation(sampling: ClientSampling) -> NeighborRel:
    """The neighbouring relation `dp_fedavg_round` is accounted under."""
    return NeighborRel.ADD_OR_REMOVE_ONE if sampling == "poisson" else NeighborRel.REPLACE_ONE


# The event classes a ledger state may hold (JSON in checkpoints); nothing else loads.
_SERIALIZABLE = {cls.__name__: cls for cls in (
    dpa.GaussianDpEvent, dpa.PoissonSampledDpEvent, dpa.SampledWithoutReplacementDpEvent)}


def event_to_json(event: dpa.DpEvent) -> dict:
    """`{"type": class name, field: value or nested event, ...}` for checkpoints."""
    name = type(event).__name__
    if name not in _SERIALIZABLE:
        raise ValueError(f"{name} is not an event this project charges")
    fields = {k: event_to_json(v) if isinstance(v, dpa.DpEvent) else v
              for k, v in attr.asdict(event, recurse=False).items()}
    return {"type": name, **fields}


def event_from_json(value: dict) -> dpa.DpEvent:
    """Inverse of `event_to_json`; refuses anything but the project's event classes."""
    if not isinstance(value, dict) or value.get("type") not in _SERIALIZABLE:
        raise ValueError(f"not a saved ledger event: {value!r} (a checkpoint written by "
                         "an older fed-dplora cannot be resumed; start a new run)")
    fields = {k: event_from_json(v) if isinstance(v, dict) else v
              for k, v in value.items() if k != "type"}
    return _SERIALIZABLE[value["type"]](**fields)
