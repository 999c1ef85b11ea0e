"""The ledgers' epsilon next to independent computations of the same event sequences.

Independent: dp-accounting's RDP accountant composing one event per step or round with
its own default orders, Opacus's RDP accountant where the settings coincide (Poisson
sampling, add/remove), and dp-accounting's PLD accountant (tighter).

    python -m experiments.privacy_check
"""

from __future__ import annotations

import logging

import dp_accounting as dpa
from dp_accounting import pld, rdp
from opacus.accountants import RDPAccountant

from fed_dplora.privacy.calibrate import calibrate_dp_fedavg_noise, calibrate_dp_sgd_noise
from fed_dplora.privacy.events import dp_fedavg_round, dp_sgd_step
from fed_dplora.privacy.ledger import FEDERATION, client_level_ledger, sample_level_ledger

log = logging.getLogger("fed_dplora.privacy_check")
REPLACE_ONE = dpa.privacy_accountant.NeighboringRelation.REPLACE_ONE


def sample_case(q: float, sigma: float, steps: int, delta: float) -> dict:
    ledger = sample_level_ledger(delta)
    ledger.record("k", dp_sgd_step(q, sigma), steps)
    step_by_step = rdp.RdpAccountant()
    for _ in range(steps):
        step_by_step.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)))
    opacus = RDPAccountant()
    opacus.history = [(sigma, q, steps)]
    tight = pld.PLDAccountant()
    tight.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    return {"ledger": ledger.epsilon("k"), "dp_accounting": step_by_step.get_epsilon(delta),
            "opacus": opacus.get_epsilon(delta), "pld": tight.get_epsilon(delta)}


def client_case(sampling: str, n: int, m: int, z: float, rounds: int, delta: float) -> dict:
    ledger = client_level_ledger(delta, sampling)
    ledger.record(FEDERATION, dp_fedavg_round(sampling, n, m, z), rounds)
    if sampling == "poisson":
        event = dpa.PoissonSampledDpEvent(m / n, dpa.GaussianDpEvent(z))
        independent, opacus = rdp.RdpAccountant(), RDPAccountant()
        opacus.history = [(z, m / n, rounds)]
        tight = pld.PLDAccountant()
        tight.compose(event, rounds)
        extra = {"opacus": opacus.get_epsilon(delta), "pld": tight.get_epsilon(delta)}
    else:  # replace-one; the sum of updates clipped to S moves by up to 2S
        event = dpa.SampledWithoutReplacementDpEvent(n, m, dpa.GaussianDpEvent(z / 2))
        independent = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE)
        extra = {"opacus": None, "pld": None}
    for _ in range(rounds):
        independent.compose(event)
    return {"ledger": ledger.epsilon(FEDERATION),
            "dp_accounting": independent.get_epsilon(delta), **extra}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    rows = []
    for target, q, steps, delta in [(8.0, 0.08, 50, 6.25e-5), (3.0, 0.02, 300, 1e-5),
                                    (1.0, 0.1, 20, 1e-5)]:
        sigma = calibrate_dp_sgd_noise(target, delta, q, steps)
        rows.append((f"sample: q={q} sigma={sigma:.4f} x {steps} steps, delta={delta:g}",
                     target, sample_case(q, sigma, steps, delta)))
    for sampling, n, m, rounds in [("poisson", 100, 10, 50), ("fixed", 100, 10, 50),
                                   ("poisson", 10, 3, 20), ("fixed", 10, 3, 20)]:
        delta = 1 / (10 * n)
        z = calibrate_dp_fedavg_noise(8.0, delta, sampling, n, m, rounds)
        rows.append((f"client {sampling}: m={m} of N={n}, z={z:.4f} x {rounds} rounds, "
                     f"delta={delta:g}", 8.0, client_case(sampling, n, m, z, rounds, delta)))
    header = ("| events | calibrated for | ledger (RDP) | dp-accounting, per step | "
              "Opacus RDP | dp-accounting PLD | ledger / dp-accounting |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for name, target, r in rows:
        def fmt(v):
            return "n/a" if v is None else f"{v:.4f}"
        lines.append(f"| {name} | {target:g} | {fmt(r['ledger'])} | {fmt(r['dp_accounting'])} "
                     f"| {fmt(r['opacus'])} | {fmt(r['pld'])} | "
                     f"{r['ledger'] / r['dp_accounting']:.4f} |")
    log.info("\n".join(lines))


if __name__ == "__main__":
    main()
