"""Which sites a round asks, and what each is told: the project's ServerApp's hooks into
`LoraFedAvg` (`node_sampler`, `node_config`).

Sampling is over the sites the privacy plan was built for, seeded from (seed, round) in
a seeded simulation (a resumed run replays it) and drawn from the OS CSPRNG otherwise.
Under client-level DP every planned site is drawn as the accountant assumes (Poisson
with probability m / N, or m of N without replacement) and a drawn site that is gone or
excluded for failing is simply not asked: a dropout, which keeps the accounting valid.
Otherwise m sites are drawn from those that can be asked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from flwr.app import ConfigRecord

from fed_dplora.config import RunSpec
from fed_dplora.privacy.plan import PrivacyPlan
from fed_dplora.seeds import derived_seed
from strategies import wire as p


@dataclass(frozen=True)
class SiteSampler:
    spec: RunSpec
    sites: list[str]  # every site of the privacy plan (N at client level)
    node_of: dict[str, int]  # the sites connected now -> their node ids
    secure: bool

    def __call__(self, server_round: int, askable: list[int]) -> list[int]:
        rng = (random.SystemRandom() if self.secure
               else random.Random(derived_seed(self.spec.seed, server_round, "sites")))
        m = self.spec.clients_per_round
        if self.spec.privacy.client_level:
            if self.spec.privacy.client_sampling == "poisson":
                drawn = [s for s in self.sites if rng.random() < m / len(self.sites)]
            else:
                drawn = rng.sample(self.sites, m)
        else:
            candidates = [s for s in self.sites if self.node_of.get(s) in askable]
            drawn = rng.sample(candidates, min(m, len(candidates)))
        return sorted(self.node_of[s] for s in drawn if self.node_of.get(s) in askable)


@dataclass(frozen=True)
class EvaluationSampler:
    """Which of the sites that share evaluation evaluate round `server_round`: all, or
    `evaluation.sites` of them drawn independently of who trained (OS CSPRNG under
    secret sampling, else seeded from (seed, round)); every site in the last planned
    round if `evaluation.final-all`."""

    spec: RunSpec
    secure: bool

    def __call__(self, server_round: int, evaluators: list[int]) -> list[int]:
        wanted = self.spec.evaluation
        last = server_round == self.spec.num_server_rounds and wanted.final_all
        if not wanted.sites or last or wanted.sites >= len(evaluators):
            return sorted(evaluators)
        rng = (random.SystemRandom() if self.secure else
               random.Random(derived_seed(self.spec.seed, server_round, "evaluate")))
        return sorted(rng.sample(evaluators, wanted.sites))

    def evaluates(self, server_round: int) -> bool:
        """Round 0 (the base score), every `evaluation.every`-th round, and the last."""
        every = self.spec.evaluation.every
        return server_round % every == 0 or server_round == self.spec.num_server_rounds


@dataclass(frozen=True)
class SiteConfigs:
    """Each site's round config: its own seed and, at sample level, its noise."""

    spec: RunSpec
    plan: PrivacyPlan
    site_of: dict[int, str]

    def __call__(self, server_round: int, node: int, shared: ConfigRecord) -> ConfigRecord:
        site = self.site_of[node]
        config = ConfigRecord({**shared,
                               p.ROUND_SEED: derived_seed(self.spec.seed, server_round, site)})
        if self.plan.sample:
            config[p.NOISE_MULTIPLIER] = self.plan.sample.noise_multiplier[site]
        return config
