"""Privacy ledgers: how often each account (a client, or the federation) ran each mechanism.

A ledger stores counts, not event lists: `{account: {DpEvent: count}}`, keyed by the
dp-accounting event of one occurrence (built by `fed_dplora.privacy.events`).
The RDP curve of one event is computed once per distinct mechanism and relation (by
dp-accounting) and cached for the process, whichever ledger asks (`rdp_curve`; each
ledger also keeps its own events' curves in a dict, the fast path of every charge); an
account's RDP is `sum(count * curve)`, recomputed from its counts so it does not depend
on the order of charges; epsilon is dp-accounting's RDP-to-(eps, delta) conversion,
vectorized over accounts. Composing is a few vector operations however long
the run. The same counts feed the final PLD report (`fed_dplora.privacy.report`) and
serialize to JSON for checkpoints.

Two ledgers exist (see `sample_level_ledger` and `client_level_ledger`); a run with
`privacy.level = "both"` keeps both and reports each under its own name.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import dp_accounting as dpa
import numpy as np

from fed_dplora.privacy.accountants import RDP_ORDERS, make_rdp_accountant
from fed_dplora.privacy.events import (SAMPLE_LEVEL_RELATION, ClientSampling, NeighborRel,
                                       client_level_relation, event_from_json, event_to_json)

FEDERATION = "federation"


class Ledger:
    """Counts of one kind of DP event per account, with epsilon at a fixed delta.

    `accepts`: the event type this ledger charges; any other raises before the ledger
    changes.
    """

    def __init__(self, kind: str, delta: float, relation: NeighborRel,
                 accepts: type[dpa.DpEvent]) -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.kind = kind
        self.delta = delta
        self.relation = relation
        self.accepts = accepts
        self.counts: dict[str, Counter[dpa.DpEvent]] = {}
        self._curves: dict[dpa.DpEvent, np.ndarray] = {}  # this ledger's planned/charged
        self._rdp: dict[str, np.ndarray] = {}  # account -> sum(count * curve)

    def prepare(self, events: list[dpa.DpEvent]) -> None:
        """Compute the RDP curves of the planned mechanisms now (one-off, before round 1)."""
        for event in events:
            self._curve(event)

    def record(self, account: str, event: dpa.DpEvent, count: int) -> None:
        self.record_many({account: (event, count)})

    def record_many(self, charges: dict[str, tuple[dpa.DpEvent, int]]) -> None:
        """Charge several accounts: {account: (event, count)}; all valid or none charged."""
        if not charges:
            return
        for event, count in charges.values():
            if count < 0:
                raise ValueError(f"count must be >= 0, got {count}")
            self._curve(event)  # validates the mechanism before any state changes
        for account, (event, count) in charges.items():
            self.counts.setdefault(account, Counter())[event] += count
        self._rdp.update(zip(charges, self._sums([self.counts[a] for a in charges])))

    def epsilon(self, account: str) -> float:
        """Epsilon of one account at the ledger's delta (0.0 if it never ran)."""
        if account not in self._rdp:
            return 0.0
        return float(epsilons(self._rdp[account][None, :], self.delta)[0])

    def epsilon_if(self, account: str, event: dpa.DpEvent, count: int) -> float:
        """Epsilon the account would have after `count` more occurrences of `event`."""
        return self.epsilons_if({account: (event, count)})[account]

    def epsilons_if(self, charges: dict[str, tuple[dpa.DpEvent, int]]) -> dict[str, float]:
        """`epsilon_if` for several accounts at once: {account: (event, count)}."""
        accounts = sorted(charges)
        if not accounts:
            return {}
        trials = []
        for account in accounts:
            event, count = charges[account]
            self._curve(event)
            held = self.counts.get(account)
            if not held or (len(held) == 1 and event in held):  # fast path, same sum
                trials.append(Counter({event: count + (held[event] if held else 0)}))
            else:
                trial = Counter(held)
                trial[event] += count
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
                "counts": {a: [[event_to_json(e), n] for e, n in sorted(c.items(), key=repr)]
                           for a, c in self.counts.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        """Replace the counts with a saved `state()` of the same kind and delta."""
        if state["kind"] != self.kind or state["delta"] != self.delta:
            raise ValueError(f"saved {state['kind']} ledger at delta {state['delta']} "
                             f"does not match this {self.kind} ledger at {self.delta}")
        self.counts, self._rdp = {}, {}
        for account, rows in state["counts"].items():
            for event, count in rows:
                self.record(account, event_from_json(event), int(count))

    def _curve(self, event: dpa.DpEvent) -> np.ndarray:
        if event not in self._curves:
            if type(event) is not self.accepts:
                raise ValueError(f"the {self.kind} ledger charges {self.accepts.__name__} "
                                 f"events, not {event!r}")
            self._curves[event] = rdp_curve(event, self.relation)
        return self._curves[event]

    def _sums(self, all_counts: list[Counter]) -> list[np.ndarray]:
        """sum(count * curve) per Counter, keys in a fixed order (history-independent)."""
        if all(len(c) == 1 for c in all_counts):  # the common case, vectorized
            events, ns = zip(*(next(iter(c.items())) for c in all_counts))
            return list(np.asarray(ns, dtype=np.float64)[:, None]
                        * np.stack([self._curves[e] for e in events]))
        return [self._sum(c) for c in all_counts]

    def _sum(self, counts: Counter) -> np.ndarray:
        events = sorted(counts, key=repr)
        total = counts[events[0]] * self._curve(events[0])
        for event in events[1:]:
            total = total + counts[event] * self._curve(event)
        return total


@functools.lru_cache(maxsize=1024)
def rdp_curve(event: dpa.DpEvent, relation: NeighborRel) -> np.ndarray:
    """dp-accounting's RDP of one `event` over `RDP_ORDERS` (read-only: it is shared)."""
    accountant = make_rdp_accountant(relation)
    accountant.compose(event)
    curve = np.array(accountant.rdp, dtype=np.float64)
    curve.setflags(write=False)
    return curve


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
    """Per client: DP-SGD steps (`dp_sgd_step` events).

    The federation's sample-level epsilon is the max over clients: their datasets are
    disjoint, so a record is only ever touched by its own client's DP-SGD. Client
    selection is data-independent and no amplification from it is claimed.
    """
    return Ledger("sample", delta, SAMPLE_LEVEL_RELATION, dpa.PoissonSampledDpEvent)


def client_level_ledger(delta: float, sampling: ClientSampling) -> Ledger:
    """One account (`FEDERATION`): DP-FedAvg rounds (`dp_fedavg_round` events)."""
    event_type = (dpa.PoissonSampledDpEvent if sampling == "poisson"
                  else dpa.SampledWithoutReplacementDpEvent)
    return Ledger(f"client-{sampling}", delta, client_level_relation(sampling), event_type)
