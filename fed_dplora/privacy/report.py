"""The final privacy report: every ledger's events, epsilon under RDP and under PLD.

RDP is what the run tracked and stopped on; PLD (dp-accounting's privacy loss
distributions) is tighter and is computed once, here, for the federation's maximum.
One PLD costs a fraction of a second, so most accounts are skipped with two exact
arguments: an account whose counts another account dominates (same mechanisms, no
fewer of any) cannot have a larger epsilon; and since PLD epsilon <= RDP epsilon, an
account whose RDP epsilon is below the largest PLD epsilon found so far cannot raise
the maximum. Accounts are visited in decreasing RDP epsilon.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import dp_accounting as dpa

from fed_dplora.privacy.accountants import (PLD_DISCRETIZATION, PLD_MAX_RDP_EPSILON,
                                            make_pld_accountant)
from fed_dplora.privacy.events import NeighborRel
from fed_dplora.privacy.ledger import Ledger


def ledger_report(ledger: Ledger, accounts: list[str], target_epsilon: float
                  ) -> dict[str, Any]:
    """One ledger's section of `privacy_report.json` (`accounts`: all that could run)."""
    rdp = {a: ledger.epsilon(a) for a in accounts}
    pld = max_pld_epsilon(ledger)
    replace_one = (pld if ledger.relation == NeighborRel.REPLACE_ONE
                   else max_pld_epsilon(ledger, NeighborRel.REPLACE_ONE))
    return {
        "relation": ledger.relation.name,
        "delta": ledger.delta,
        "target_epsilon": target_epsilon,
        "events": {a: [{"event": repr(e), "count": n}
                       for e, n in sorted(ledger.counts.get(a, Counter()).items(), key=repr)]
                   for a in accounts},
        "epsilon_rdp": rdp,
        "epsilon_rdp_max": max(rdp.values(), default=0.0),
        "epsilon_rdp_mean": ledger.mean_epsilon(accounts),
        "epsilon_pld_max": pld,
        # n (sample level) and N (client level) are published: replace-one is the
        # relation a reader can hold a site or the federation to.
        "epsilon_pld_replace_one_max": replace_one,
        "pld_discretization": PLD_DISCRETIZATION,
        "pld_note": None if pld is not None else
            "dp-accounting's PLD accountant does not support this mechanism (sampling "
            "without replacement); the RDP figure is the reported bound",
    }


def max_pld_epsilon(ledger: Ledger, relation: NeighborRel | None = None,
                    discretization: float = PLD_DISCRETIZATION) -> float | None:
    """Largest PLD epsilon over the ledger's accounts under `relation` (default: the
    ledger's own); None where PLD does not support the mechanism."""
    relation = relation or ledger.relation
    rdp = ledger.per_account()
    by_rdp = [(rdp[a], ledger.counts[a]) for a in sorted(rdp, key=rdp.get, reverse=True)]
    # PLD epsilon <= RDP epsilon holds for the relation the RDP curves were made for.
    skip_below_rdp = relation == ledger.relation
    best = 0.0
    for rdp_epsilon, counts in _undominated(by_rdp):
        if skip_below_rdp and rdp_epsilon <= best:
            break  # the rest have smaller RDP epsilon, so smaller PLD epsilon
        epsilon = pld_epsilon(_frozen(counts), ledger.delta, relation, discretization,
                              rdp_epsilon=rdp_epsilon)
        if epsilon is None:
            return None
        best = max(best, epsilon)
    return best


@functools.lru_cache(maxsize=4096)
def pld_epsilon(counts: tuple[tuple[dpa.DpEvent, int], ...], delta: float,
                relation: NeighborRel, discretization: float = PLD_DISCRETIZATION, *,
                rdp_epsilon: float) -> float | None:
    """PLD epsilon of `counts` ((event, count) pairs) composed, at `delta`; None where
    PLD does not support an event; infinite where the caller's RDP epsilon of the same
    counts is above PLD_MAX_RDP_EPSILON (the PLD would not fit in memory). Cached: an
    account that did not run since the last call costs nothing."""
    if rdp_epsilon > PLD_MAX_RDP_EPSILON:
        return float("inf")
    accountant = make_pld_accountant(relation, discretization)
    try:
        for event, count in counts:
            if count:
                accountant.compose(event, count)
    except dpa.UnsupportedEventError:
        return None
    return float(accountant.get_epsilon(delta))


def _frozen(counts: Counter) -> tuple[tuple[dpa.DpEvent, int], ...]:
    return tuple(sorted(((e, n) for e, n in counts.items() if n), key=repr))


def _undominated(accounts: list[tuple[float, Counter]]) -> list[tuple[float, Counter]]:
    """(epsilon, counts) pairs whose counts no other pair dominates, in the given order."""
    unique = {tuple(sorted(c.items(), key=repr)): (e, c) for e, c in accounts
              if any(c.values())}
    kept = list(unique.values())
    return [(e, c) for e, c in kept
            if not any(o is not c and _dominates(o, c) for _, o in kept)]


def _dominates(big: Counter, small: Counter) -> bool:
    return all(big.get(k, 0) >= n for k, n in small.items())
