"""Sample-level privacy ledger: per client, the DP-SGD steps it actually took.

The federation's sample-level epsilon is the max over clients: their datasets are
disjoint, so a record is only ever touched by its own client's DP-SGD. Client selection
is data-independent and no amplification from it is claimed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fed_dplora.privacy.accountants import make_rdp_accountant
from fed_dplora.privacy.events import dp_sgd_steps


@dataclass
class SampleLevelLedger:
    """Composes, per client, the DP-SGD steps reported after noise was really added."""

    delta: float
    # client id -> {(sampling probability, noise multiplier): steps}
    steps: dict[str, Counter] = field(default_factory=dict)
    _cache: dict[str, float] = field(default_factory=dict, repr=False)

    def record(self, client: str, sampling_probability: float, noise_multiplier: float,
               steps: int) -> None:
        # Build the event first: an invalid mechanism raises before any state changes.
        dp_sgd_steps(sampling_probability, noise_multiplier, steps)
        self.steps.setdefault(client, Counter())[
            (sampling_probability, noise_multiplier)] += steps
        self._cache.pop(client, None)

    def epsilon(self, client: str) -> float:
        """Epsilon of one client at the ledger's delta (0.0 if it never trained)."""
        if client not in self._cache:
            accountant = make_rdp_accountant()
            for (q, sigma), n in sorted(self.steps.get(client, {}).items()):
                accountant.compose(dp_sgd_steps(q, sigma, n))
            self._cache[client] = float(accountant.get_epsilon(self.delta))
        return self._cache[client]

    def epsilon_if(self, client: str, sampling_probability: float,
                   noise_multiplier: float, steps: int) -> float:
        """Epsilon the client would have after `steps` more steps (for budget checks)."""
        trial = SampleLevelLedger(self.delta, {client: Counter(self.steps.get(client, {}))})
        trial.record(client, sampling_probability, noise_multiplier, steps)
        return trial.epsilon(client)

    def max_epsilon(self) -> float:
        return max((self.epsilon(c) for c in self.steps), default=0.0)

    def per_client(self) -> dict[str, float]:
        return {c: self.epsilon(c) for c in sorted(self.steps)}
