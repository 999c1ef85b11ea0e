"""Fresh dp-accounting accountants, configured once for the whole project."""

from __future__ import annotations

import logging

from dp_accounting import pld, rdp

from fed_dplora.privacy.events import NeighborRel

# dp-accounting's default orders (fractional ones near 1 matter below eps ~ 10: without
# them eps = 8 reads ~5% high) plus a few more between 64 and 1024 for large epsilon.
RDP_ORDERS = sorted({1 + x / 10 for x in range(1, 100)} | set(range(11, 64))
                    | {64, 72, 80, 96, 112, 128, 160, 192, 256, 384, 512, 1024})
assert min(RDP_ORDERS) > 1.01  # the vectorized conversion in ledger.py relies on it
PLD_DISCRETIZATION = 1e-4  # the final report
# Each round's live replace-one value and a site's limit check: 10x coarser, about 10x
# faster (0.2 s for the default job's 50 steps), still an upper bound (dp-accounting's
# PLD discretization is pessimistic), and within 1e-4 of the fine value there.
LIVE_PLD_DISCRETIZATION = 1e-3
# A PLD's grid grows with 1/sigma^2: at sigma 0.0044 (q 0.1, 100 steps) it took 23 GB
# and the process was killed. Above this RDP epsilon (the caller's, of the same events),
# PLD epsilon is reported as infinite instead (always an upper bound; sigma/10 of an
# eps-1 run, RDP eps 61, still gets its PLD). No site or study asks for anything near it.
PLD_MAX_RDP_EPSILON = 200.0


class _QuietConvergence(logging.Filter):
    """dp-accounting logs each fractional order whose series does not converge and then
    excludes that order, which can only raise epsilon (safe). Keep the log readable."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietConvergence())


def make_rdp_accountant(relation: NeighborRel = NeighborRel.ADD_OR_REMOVE_ONE
                        ) -> rdp.RdpAccountant:
    return rdp.RdpAccountant(RDP_ORDERS, relation)


def make_pld_accountant(relation: NeighborRel = NeighborRel.ADD_OR_REMOVE_ONE,
                        discretization: float = PLD_DISCRETIZATION) -> pld.PLDAccountant:
    return pld.PLDAccountant(relation, value_discretization_interval=discretization)
