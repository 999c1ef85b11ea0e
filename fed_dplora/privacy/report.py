"""The final privacy report: every ledger's events, epsilon under RDP and under PLD.

RDP is what the run tracked and stopped on; PLD (dp-accounting's privacy loss
distributions) is tighter and is computed once, here. Accounts whose counts are
dominated by another account's (same mechanisms, no more of any) cannot have a larger
epsilon, so PLD is computed only for the undominated ones: a handful even for large
federations, where one PLD costs a fraction of a second.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import dp_accounting as dpa

from fed_dplora.privacy.accountants import PLD_DISCRETIZATION, make_pld_accountant
from fed_dplora.privacy.ledger import Ledger


def ledger_report(ledger: Ledger, accounts: list[str], target_epsilon: float
                  ) -> dict[str, Any]:
    """One ledger's section of `privacy_report.json` (`accounts`: all that could run)."""
    rdp = {a: ledger.epsilon(a) for a in accounts}
    pld = max_pld_epsilon(ledger)
    return {
        "relation": ledger.relation.name,
        "delta": ledger.delta,
        "target_epsilon": target_epsilon,
        "events": {a: [{"event": repr(ledger.event(k)), "count": n}
                       for k, n in sorted(ledger.counts.get(a, Counter()).items(), key=repr)]
                   for a in accounts},
        "epsilon_rdp": rdp,
        "epsilon_rdp_max": max(rdp.values(), default=0.0),
        "epsilon_rdp_mean": sum(rdp.values()) / len(rdp) if rdp else 0.0,
        "epsilon_pld_max": pld,
        "pld_discretization": PLD_DISCRETIZATION,
        "pld_note": None if pld is not None else
            "dp-accounting's PLD accountant does not support this mechanism (sampling "
            "without replacement); the RDP figure is the reported bound",
    }


def max_pld_epsilon(ledger: Ledger) -> float | None:
    """Largest PLD epsilon over the ledger's accounts (None: PLD unsupported)."""
    best = 0.0
    for counts in _undominated(list(ledger.counts.values())):
        accountant = make_pld_accountant(ledger.relation)
        try:
            for key, count in sorted(counts.items(), key=repr):
                if count:
                    accountant.compose(ledger.event(key), count)
        except dpa.UnsupportedEventError:
            return None
        best = max(best, float(accountant.get_epsilon(ledger.delta)))
    return best


def _undominated(signatures: list[Counter]) -> list[Counter]:
    unique = {tuple(sorted(s.items(), key=repr)): s for s in signatures if any(s.values())}
    kept = list(unique.values())
    return [s for s in kept
            if not any(o is not s and _dominates(o, s) for o in kept)]


def _dominates(big: Counter, small: Counter) -> bool:
    return all(big.get(k, 0) >= n for k, n in small.items())
