"""Parties on their own network stacks, on one machine: the coordinator and each
hospital in a Linux network namespace, joined by a bridge in the coordinator's, on
TEST-NET-2 (198.51.100.0/24, RFC 5737: documentation addresses, routed nowhere). Nothing
touches the machine's own network: every link is made inside the namespaces and goes
with them.

WAN conditions per hospital link, each made where this kernel can: rate (tbf, both
ends), loss (nftables `numgen random`, both directions), latency (experiments.
delay_proxy in the hospital's namespace: this kernel has no netem qdisc). A link can be
cut and restored. Needs root and iproute2 (`ip`, `tc`); loss needs `nft`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

NET = "198.51.100"
COORDINATOR = "coordinator"


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"missing {missing} (Debian: iproute2)" if missing else None


@dataclass
class NetLab:
    hospitals: tuple[str, ...]
    tag: str = field(default_factory=lambda: str(os.getpid() % 100_000))

    def namespace(self, party: str) -> str:
        return f"fdp{self.tag}-{party}"

    def address(self, party: str) -> str:
        return f"{NET}.1" if party == COORDINATOR else f"{NET}.{11 + self._index(party)}"

    def command(self, party: str, *argv: str) -> list[str]:
        """`argv` run inside `party`'s network namespace."""
        return ["ip", "netns", "exec", self.namespace(party), *argv]

    def create(self) -> "NetLab":
        coordinator = self.namespace(COORDINATOR)
        self._ip("netns", "add", coordinator)
        self._ip("-n", coordinator, "link", "set", "lo", "up")
        self._ip("-n", coordinator, "link", "add", "br0", "type", "bridge")
        self._ip("-n", coordinator, "addr", "add", f"{NET}.1/24", "dev", "br0")
        self._ip("-n", coordinator, "link", "set", "br0", "up")
        for hospital in self.hospitals:
            self._join(hospital)
        return self

    def destroy(self) -> None:
        for party in (COORDINATOR, *self.hospitals):
            subprocess.run(["ip", "netns", "del", self.namespace(party)],
                           capture_output=True)

    def set_rate(self, hospital: str, mbit: float) -> None:
        """A rate limit on the hospital's link, both directions (tbf)."""
        for namespace, device in self._ends(hospital):
            self._run("tc", "-n", namespace, "qdisc", "replace", "dev", device, "root",
                      "tbf", "rate", f"{mbit}mbit", "burst", "64kb", "latency", "400ms")

    def set_loss(self, hospital: str, percent: float) -> bool:
        """Drop `percent` of the hospital's packets each way; False without nftables."""
        if shutil.which("nft") is None:
            return False
        namespace, per_mille = self.namespace(hospital), int(round(percent * 10))
        rules = "\n".join([
            "table inet wan {",
            *(f"  chain {hook} {{ type filter hook {hook} priority 0; "
              f"numgen random mod 1000 < {per_mille} drop; }}" for hook in ("input", "output")),
            "}"])
        subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input=rules,
                       text=True, check=True, capture_output=True)
        return True

    def cut(self, hospital: str) -> None:
        self._ip("-n", self.namespace(hospital), "link", "set", "eth0", "down")

    def restore(self, hospital: str) -> None:
        self._ip("-n", self.namespace(hospital), "link", "set", "eth0", "up")

    def _join(self, hospital: str) -> None:
        """A veth pair: eth0 in the hospital's namespace, its peer on the bridge."""
        namespace, peer = self.namespace(hospital), self._peer(hospital)
        self._ip("netns", "add", namespace)
        self._ip("-n", self.namespace(COORDINATOR), "link", "add", peer, "type", "veth",
                 "peer", "name", "eth0", "netns", namespace)
        self._ip("-n", self.namespace(COORDINATOR), "link", "set", peer, "master", "br0",
                 "up")
        self._ip("-n", namespace, "addr", "add", f"{self.address(hospital)}/24", "dev", "eth0")
        for device in ("lo", "eth0"):
            self._ip("-n", namespace, "link", "set", device, "up")

    def _ends(self, hospital: str) -> list[tuple[str, str]]:
        return [(self.namespace(hospital), "eth0"),
                (self.namespace(COORDINATOR), self._peer(hospital))]

    def _peer(self, hospital: str) -> str:
        return f"v{self.tag}h{self._index(hospital)}"[:15]

    def _index(self, hospital: str) -> int:
        return self.hospitals.index(hospital)

    def _ip(self, *argv: str) -> None:
        self._run("ip", *argv)

    @staticmethod
    def _run(*argv: str) -> None:
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")
