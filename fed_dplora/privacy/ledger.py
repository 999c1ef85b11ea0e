"""Privacy ledgers: how often each account (a client, or the federation) ran each mechanism.

A ledger stores counts, not event lists: `{account: {mechanism parameters: count}}`.
The RDP curve of one event is computed once per distinct mechanism (by dp-accounting)
and cached; an account's RDP is `sum(count * curve)`, recomputed from its counts so it
does not depend on the order of charges; epsilon is dp-accounting's RDP-to-(eps, delta)
conversion, vectorized over accounts. Composing is a few vector operations however long
the run. The same counts feed the final PLD report (`fed_dplora.privacy.report`) and
serialize to JSON for checkpoints.

Two ledgers exist (see `sample_level_ledger` and `client_level_ledger`); a run with
`privacy.level = "both"` keeps both and reports each under its own name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

import dp_accounting as dpa
import numpy as np

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
        self._rdp: dict[str, np.ndarray] = {}  # account -> sum(count * curve)

    def prepare(self, keys: list[Key]) -> None:
        """Compute the RDP curves of the planned mechanisms now (one-off, before round 1)."""
        for key in keys:
            self._curve(tuple(key))

    def event(self, key: Key) -> dpa.DpEvent:
        return self.build_event(*key)

    def record(self, account: str, key: Key, count: int) -> None:
        self.record_many({account: (key, count)})

    def record_many(self, charges: dict[str, tuple[Key, int]]) -> None:
        """Charge several accounts: {account: (key, count)}; all valid or none charged."""
        for key, count in charges.values():
            if count < 0:
                raise ValueError(f"count must be >= 0, got {count}")
            self._curve(tuple(key))  # validates the mechanism before any state changes
        for account, (key, count) in charges.items():
            self.counts.setdefault(account, Counter())[tuple(key)] += count
        self._rdp.update(zip(charges, self._sums([self.counts[a] for a in charges])))

    def epsilon(self, account: str) -> float:
        """Epsilon of one account at the ledger's delta (0.0 if it never ran)."""
        if account not in self._rdp:
            return 0.0
        return float(epsilons(self._rdp[account][None, :], self.delta)[0])

    def epsilon_if(self, account: str, key: Key, count: int) -> float:
        """Epsilon the account would have after `count` more occurrences of `key`."""
        return self.epsilons_if({account: (key, count)})[account]

    def epsilons_if(self, charges: dict[str, tuple[Key, int]]) -> dict[str, float]:
        """`epsilon_if` for several accounts at once: {account: (key, count)}."""
        accounts = sorted(charges)
        if not accounts:
            return {}
        trials = []
        for account in accounts:
            key, count = tuple(charges[account][0]), charges[account][1]
            self._curve(key)
            held = self.counts.get(account)
            if not held or (len(held) == 1 and key in held):  # fast path, same sum
                trials.append(Counter({key: count + (held[key] if held else 0)}))
            else:
                trial = Counter(held)
                trial[key] += count
                trials.append(trial)
        rdp = np.stack(self._sums(trials))
        return dict(zip(accounts, map(float, epsilons(rdp, self.delta))))

    def per_account(self) -> dict[str, float]:
        accounts = sorted(self._rdp)
        if not accounts:
            return {}
        values = epsilons(np.stack([self._rdp[a] for a in accounts]), self.delta)
        return dict(zip(accounts, map(float, values)))

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
        self.counts, self._rdp = {}, {}
        for account, rows in state["counts"].items():
            for *key, count in rows:
                self.record(account, tuple(key), int(count))

    def _curve(self, key: Key) -> np.ndarray:
        if key not in self._curves:
            accountant = make_rdp_accountant(self.relation)
            accountant.compose(self.event(key))
            self._curves[key] = accountant.rdp
        return self._curves[key]

    def _sums(self, all_counts: list[Counter]) -> list[np.ndarray]:
        """sum(count * curve) per Counter, keys in a fixed order (history-independent)."""
        if all(len(c) == 1 for c in all_counts):  # the common case, vectorized
            keys, ns = zip(*(next(iter(c.items())) for c in all_counts))
            return list(np.asarray(ns, dtype=np.float64)[:, None]
                        * np.stack([self._curves[k] for k in keys]))
        return [self._sum(c) for c in all_counts]

    def _sum(self, counts: Counter) -> np.ndarray:
        keys = sorted(counts)
        total = counts[keys[0]] * self._curve(keys[0])
        for key in keys[1:]:
            total = total + counts[key] * self._curve(key)
        return total


def epsilons(rdp: np.ndarray, delta: float) -> np.ndarray:
    """Epsilon at `delta` for each row of RDP values over `RDP_ORDERS`.

    dp-accounting's `compute_epsilon` (the bound of Canonne, Kamath and Steinke 2020,
    Prop. 12 of arXiv:2004.00010, with its zero and negative-RDP cases), vectorized
    over rows; tests check it against dp-accounting value for value.
    """
    orders = np.asarray(RDP_ORDERS, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        eps = rdp + np.log1p(-1.0 / orders) - np.log(delta * orders) / (orders - 1.0)
        eps = np.where((rdp < 0) | (delta ** 2 + np.expm1(-rdp) > 0), 0.0, eps)
    return np.maximum(0.0, eps.min(axis=1))


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
