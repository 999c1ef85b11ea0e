"""The server's central accountant: plan, ledgers, budget checks and the final report.

Sample level: one ledger account per client site (stable across runs), charged with
the (q, sigma, steps) each client reports it used, which must equal what the plan
asked. Client level: one account, charged once per DP-FedAvg round released. Both
levels keep their own ledger and are reported under their own names.
"""

from __future__ import annotations

from typing import Any

from fed_dplora.config import RunSpec
from fed_dplora.privacy.accountants import LIVE_PLD_DISCRETIZATION
from fed_dplora.privacy.events import NeighborRel
from fed_dplora.privacy.ledger import (FEDERATION, Ledger, client_level_ledger,
                                       sample_level_ledger)
from fed_dplora.privacy.plan import PrivacyPlan, plan_client_level, plan_sample_level
from fed_dplora.privacy.report import ledger_report, max_pld_epsilon


class AccountingError(RuntimeError):
    """A client used a mechanism other than the one planned: it cannot be charged."""


def plan_privacy(spec: RunSpec, sizes: dict[str, int]) -> PrivacyPlan:
    """Calibrate each enabled level for `spec.num_server_rounds` rounds."""
    privacy = spec.privacy
    sample = client = None
    if privacy.sample_level:
        sample = plan_sample_level(
            privacy.target_epsilon, privacy.delta, spec.train.batch_size, sizes,
            spec.num_server_rounds * spec.train.local_steps, privacy.noise_multiplier)
    if privacy.client_level:
        client = plan_client_level(
            privacy.client_target_epsilon, privacy.client_delta, privacy.client_sampling,
            len(sizes), spec.clients_per_round, spec.num_server_rounds,
            privacy.client_clip_norm, privacy.client_noise_multiplier)
    return PrivacyPlan(sample, client)


class CentralAccountant:
    def __init__(self, plan: PrivacyPlan, local_steps: int) -> None:
        self.plan = plan
        self.local_steps = local_steps
        self.ledgers: dict[str, Ledger] = {}
        if plan.sample:
            self.ledgers["sample"] = sample_level_ledger(plan.sample.delta)
            self.ledgers["sample"].prepare(
                [plan.sample.step_event(site) for site in plan.sample.noise_multiplier])
        if plan.client:
            self.ledgers["client"] = client_level_ledger(plan.client.delta,
                                                         plan.client.sampling)
            self.ledgers["client"].prepare([plan.client.round_event])

    def planned_sample_charges(self, sites: list[str]) -> dict[str, list]:
        """What the sample ledger will be charged if `sites` train this round."""
        if not self.plan.sample:
            return {}
        sample = self.plan.sample
        return {s: [sample.sampling_probability[s], sample.noise_multiplier[s],
                    self.local_steps] for s in sites}

    def refusal(self, sites: list[str]) -> str | None:
        """Why a round with `sites` would push a reported epsilon past its target."""
        if self.plan.sample:
            after = self.ledgers["sample"].epsilons_if(
                {s: (self.plan.sample.step_event(s), self.local_steps) for s in sites})
            for site in sorted(after, key=after.get, reverse=True)[:1]:
                if after[site] > self.plan.sample.target_epsilon:
                    return (f"another round would take client {site} to sample-level "
                            f"epsilon {after[site]:.4f} > target "
                            f"{self.plan.sample.target_epsilon:g}")
        if self.plan.client:
            after = self.ledgers["client"].epsilon_if(FEDERATION, self.plan.client.round_event,
                                                      1)
            if after > self.plan.client.target_epsilon:
                return (f"another round would take the federation to client-level epsilon "
                        f"{after:.4f} > target {self.plan.client.target_epsilon:g}")
        return None

    def charge_sample(self, used: dict[str, tuple[float, float, int]]) -> None:
        """Charge what clients report they used, {site: (q, sigma, steps)}; it must be
        what the plan asked, or nothing is charged and the round is refused."""
        if not self.plan.sample:
            noisy = {s: u for s, u in used.items() if u[1]}
            if noisy:
                raise AccountingError(f"client(s) {sorted(noisy)} report DP-SGD noise in a "
                                      "run without sample-level DP")
            return
        sample = self.plan.sample
        for site, (q, sigma, steps) in used.items():
            q_asked, sigma_asked = sample.sampling_probability[site], sample.noise_multiplier[site]
            steps_asked = self.local_steps
            if (abs(q - q_asked) > 1e-9 * q_asked or steps != steps_asked
                    or abs(sigma - sigma_asked) > 1e-9 * max(1.0, sigma_asked)):
                raise AccountingError(
                    f"client {site} used (q, sigma, steps)={(q, sigma, steps)}, the server "
                    f"asked for {(q_asked, sigma_asked, steps_asked)}: refusing an update "
                    "the ledger cannot account for")
        self.ledgers["sample"].record_many(
            {site: (sample.step_event(site), steps) for site, (_, _, steps) in used.items()})

    def charge_client_round(self) -> None:
        if self.plan.client:
            self.ledgers["client"].record(FEDERATION, self.plan.client.round_event, 1)

    def charge_planned(self, charges: dict[str, list]) -> None:
        """Charge a round's planned sample-level steps (a lost round, see server)."""
        self.charge_sample({site: (q, sigma, int(steps))
                            for site, (q, sigma, steps) in charges.items()})

    def epsilon_sample(self) -> float | None:
        return self.ledgers["sample"].max_epsilon() if self.plan.sample else None

    def epsilon_client(self) -> float | None:
        return self.ledgers["client"].epsilon(FEDERATION) if self.plan.client else None

    def epsilon_sample_replace_one(self) -> float | None:
        """The max over clients under replace-one neighbours (each client's n is
        published, so add and remove are told apart): PLD, at the live discretization."""
        if not self.plan.sample:
            return None
        return max_pld_epsilon(self.ledgers["sample"], NeighborRel.REPLACE_ONE,
                               LIVE_PLD_DISCRETIZATION)

    def state(self) -> dict[str, Any]:
        return {name: ledger.state() for name, ledger in self.ledgers.items()}

    def state_if_secret(self, sites: list[str], rounds: int) -> dict[str, Any]:
        """`state()` with the sample ledger as secret sampling reports it: every site
        charged its planned steps in each of `rounds` (its actual counts would tell how
        often it was drawn)."""
        state = self.state()
        if self.plan.sample:
            state["sample"] = self._bound_if_every_round(sites, rounds).state()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        if sorted(state) != sorted(self.ledgers):
            raise ValueError(f"checkpoint holds ledgers {sorted(state)}, this run "
                             f"keeps {sorted(self.ledgers)}")
        for name, ledger in self.ledgers.items():
            ledger.restore(state[name])

    def report(self, sites: list[str], rounds_if_secret: int | None = None
               ) -> dict[str, Any]:
        """`privacy_report.json`: mechanisms, parameters, events, RDP and PLD epsilon.

        `rounds_if_secret` (secret client sampling): the sample level is reported as if
        every site had trained in each of these rounds, since the per-site values would
        tell how often each was drawn; the actual spend is checked to be within it."""
        report: dict[str, Any] = {"levels": sorted(self.ledgers)}
        if self.plan.sample:
            plan = self.plan.sample
            ledger = self.ledgers["sample"]
            if rounds_if_secret is not None:
                ledger = self._bound_if_every_round(sites, rounds_if_secret)
            report["sample"] = {
                "unit": "one record of one client", "mechanism": "DP-SGD: Poisson "
                "sampling q_k, per-sample clipping to C, Gaussian noise sigma_k * C per "
                "step (PoissonSampledDpEvent(q_k, GaussianDpEvent(sigma_k)))",
                "sampling_probability": plan.sampling_probability,
                "noise_multiplier": plan.noise_multiplier,
                "epsilon_note": "federation value = max over clients (disjoint data); "
                                "no amplification from client sampling is claimed",
                **({} if rounds_if_secret is None else {"bound_note": (
                    f"secret sampling: each site as if it trained in all {rounds_if_secret} "
                    "rounds charged (its actual spend is at most this; the actual values "
                    "would reveal how often it was drawn)")}),
                **ledger_report(ledger, sites, plan.target_epsilon)}
        if self.plan.client:
            plan = self.plan.client
            report["client"] = {
                "unit": "all records of one client", "mechanism": "DP-FedAvg: client "
                f"sampling {plan.sampling!r}, update clipping to S, Gaussian noise z * S "
                "on the sum, fixed denominator m",
                "sampling": plan.sampling, "num_clients": plan.num_clients,
                "expected_clients": plan.expected_clients, "clip_norm": plan.clip_norm,
                "noise_multiplier": plan.noise_multiplier,
                **ledger_report(self.ledgers["client"], [FEDERATION], plan.target_epsilon)}
        return report

    def _bound_if_every_round(self, sites: list[str], rounds: int) -> Ledger:
        """A sample ledger charging every site its planned steps in each of `rounds`;
        raises if any site's actual charges exceed it (the bound would not hold)."""
        steps = rounds * self.local_steps
        bound = sample_level_ledger(self.plan.sample.delta)
        bound.record_many({s: (self.plan.sample.step_event(s), steps) for s in sites})
        for site, counts in self.ledgers["sample"].counts.items():
            if any(n > bound.counts.get(site, {}).get(e, 0) for e, n in counts.items()):
                raise AccountingError(f"client {site} was charged more than {rounds} rounds "
                                      "of its planned steps: the bound would not hold")
        return bound
