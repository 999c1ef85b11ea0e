"""Fresh dp-accounting accountants, configured once for the whole project."""

from __future__ import annotations

from dp_accounting import rdp

# Integer RDP orders: dp-accounting computes them in closed form, while its fractional
# orders near 1 fail to converge for common (q, sigma) and get dropped with a warning.
# Integer-only is at worst slightly conservative at very large epsilon.
RDP_ORDERS = list(range(2, 129)) + [160, 192, 256, 384, 512, 1024]


def make_rdp_accountant() -> rdp.RdpAccountant:
    return rdp.RdpAccountant(RDP_ORDERS)
