"""Privacy ledgers: how often each account (a client, or the federation) ran each mechanism.

A ledger stores counts, not event lists: `{account: {mechanism parameters: count}}`.
The RDP curve of one event is computed once per distinct mechanism and cached; an
account's epsilon is the RDP conversion of `sum(count * curve)`. Composing is therefore
a few vector additions, however long the run. The same counts feed the final PLD report
(`fed_dplora.privacy.report`) and serialize to JSON for checkpoints.

Two ledgers exist (see `sample_level_ledger` and `client_level_ledger`); a run with
`privacy.level = "both"` keeps both and reports each under its own name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

import dp_accounting as dpa
import numpy as np
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from fed_dplora.privacy.accountants import RDP_ORDERS, make_rdp_accountant
from fed_dplora.privacy.events import (SAMPLE_LEVEL_RELATION, ClientSampling, NeighborRel,
                                       client_level_relation, dp_fedavg_round, dp_sgd_step)

Key = tuple[Hashable, ...]
FEDERATION = "federation"


class Ledger:
    """Counts of one kind of DP event per account, with epsilon at a fixed delta.

    `build_event(*key)` is the project's event builder for one occurrence; a key that
    builds no valid event raises before the ledger changes.
    """

    def __init__(self, kind: str, delta: float, relation: NeighborRel,
                 build_event: Callable[..., dpa.DpEvent]) -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.kind = kind
        self.delta = delta
        self.relation = relation
        self.build_event = build_event
        self.counts: dict[str, Counter[Key]] = {}
        self._curves: dict[Key, np.ndarray] = {}

    def event(self, key: Key) -> dpa.DpEvent:
        return self.build_event(*key)

    def record(self, account: str, key: Key, count: int) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self._curve(tuple(key))  # validates the mechanism before any state changes
        self.counts.setdefault(account, Counter())[tuple(key)] += count

    def epsilon(self, account: str) -> float:
        """Epsilon of one account at the ledger's delta (0.0 if it never ran)."""
        return self._epsilon(self.counts.get(account, Counter()))

    def epsilon_if(self, account: str, key: Key, count: int) -> float:
        """Epsilon the account would have after `count` more occurrences of `key`."""
        trial = Counter(self.counts.get(account, Counter()))
        self._curve(tuple(key))
        trial[tuple(key)] += count
        return self._epsilon(trial)

    def per_account(self) -> dict[str, float]:
        return {a: self.epsilon(a) for a in sorted(self.counts)}

    def max_epsilon(self) -> float:
        return max(self.per_account().values(), default=0.0)

    def mean_epsilon(self, accounts: list[str]) -> float:
        """Mean over `accounts`, counting those that never ran as 0."""
        return float(np.mean([self.epsilon(a) for a in accounts])) if accounts else 0.0

    def state(self) -> dict[str, Any]:
        """JSON-serializable counts (see `restore`)."""
        return {"kind": self.kind, "delta": self.delta,
                "counts": {a: [[*k, n] for k, n in sorted(c.items(), key=repr)]
                           for a, c in self.counts.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        """Replace the counts with a saved `state()` of the same kind and delta."""
        if state["kind"] != self.kind or state["delta"] != self.delta:
            raise ValueError(f"saved {state['kind']} ledger at delta {state['delta']} "
                             f"does not match this {self.kind} ledger at {self.delta}")
        self.counts = {}
        for account, rows in state["counts"].items():
            for *key, count in rows:
                self.record(account, tuple(key), int(count))

    def _curve(self, key: Key) -> np.ndarray:
        if key not in self._curves:
            accountant = make_rdp_accountant(self.relation)
            accountant.compose(self.event(key))
            self._curves[key] = accountant.rdp
        return self._curves[key]

    def _epsilon(self, counts: Counter) -> float:
        if not any(counts.values()):
            return 0.0
        rdp = sum(n * self._curve(k) for k, n in counts.items())
        return float(compute_epsilon(RDP_ORDERS, rdp, self.delta)[0])


def sample_level_ledger(delta: float) -> Ledger:
    """Per client: DP-SGD steps keyed by (sampling probability, noise multiplier).

    The federation's sample-level epsilon is the max over clients: their datasets are
    disjoint, so a record is only ever touched by its own client's DP-SGD. Client
    selection is data-independent and no amplification from it is claimed.
    """
    return Ledger("sample", delta, SAMPLE_LEVEL_RELATION, dp_sgd_step)


def client_level_ledger(delta: float, sampling: ClientSampling) -> Ledger:
    """One account (`FEDERATION`): DP-FedAvg rounds keyed by
    (sampling, number of clients, expected clients per round, noise multiplier)."""
    return Ledger(f"client-{sampling}", delta, client_level_relation(sampling),
                  dp_fedavg_round)
