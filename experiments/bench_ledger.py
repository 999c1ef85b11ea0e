"""Ledger benchmark: per-round RDP tracking and the final PLD report at scale.

Drives the server's `CentralAccountant` exactly as the ServerApp does each round
(budget check for the sampled clients, charge what they used, one DP-FedAvg round,
read both epsilons), for 1,000 rounds x 100 clients x 10 local steps, in two
participation patterns: every client every round, and 10 of 100 sampled per round
(so clients hold different step counts). Then times the final report (PLD).

    python -m experiments.bench_ledger [--rounds 1000] [--clients 100] [--steps 10]
"""

from __future__ import annotations

import argparse
import logging
import random
import time

from fed_dplora.config import PrivacySpec, RunSpec, TrainSpec
from fed_dplora.privacy.central import CentralAccountant, plan_privacy

log = logging.getLogger("fed_dplora.bench_ledger")


def run(rounds: int, clients: int, per_round: int, steps: int) -> dict[str, float]:
    spec = RunSpec(num_server_rounds=rounds, clients_per_round=per_round,
                   privacy=PrivacySpec(level="both", target_epsilon=1e6,
                                       client_target_epsilon=1e6, noise_multiplier=1.0,
                                       client_noise_multiplier=1.0),
                   train=TrainSpec(local_steps=steps, batch_size=64))
    sizes = {f"site-{i:03d}": 2000 + 37 * i for i in range(clients)}  # distinct q_k
    start = time.perf_counter()
    accountant = CentralAccountant(plan_privacy(spec, sizes), steps)
    setup = time.perf_counter() - start
    rng = random.Random(0)
    sites = sorted(sizes)
    start = time.perf_counter()
    for _ in range(rounds):
        sampled = sorted(rng.sample(sites, per_round))
        assert accountant.refusal(sampled) is None
        accountant.charge_planned(accountant.planned_sample_charges(sampled))
        accountant.charge_client_round()
        accountant.epsilon_sample(), accountant.epsilon_client()
    tracking = time.perf_counter() - start
    start = time.perf_counter()
    report = accountant.report(sites)
    final = time.perf_counter() - start
    return {"setup_s": setup, "tracking_s": tracking, "report_s": final,
            "eps_sample_rdp": report["sample"]["epsilon_rdp_max"],
            "eps_sample_pld": report["sample"]["epsilon_pld_max"],
            "eps_client_rdp": report["client"]["epsilon_rdp_max"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("%d rounds x %d clients x %d local steps (RDP per round, PLD at the end)",
             args.rounds, args.clients, args.steps)
    log.info("%-22s %9s %12s %10s %10s %10s %10s", "participation", "setup s",
             "tracking s", "report s", "eps RDP", "eps PLD", "eps client")
    for per_round in (args.clients, max(1, args.clients // 10)):
        r = run(args.rounds, args.clients, per_round, args.steps)
        log.info("%-22s %9.2f %12.3f %10.2f %10.3f %10.3f %10.3f",
                 f"{per_round} of {args.clients}/round", r["setup_s"], r["tracking_s"],
                 r["report_s"], r["eps_sample_rdp"], r["eps_sample_pld"],
                 r["eps_client_rdp"])


if __name__ == "__main__":
    main()
