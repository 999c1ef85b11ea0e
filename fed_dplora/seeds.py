"""Seeds derived from the run seed: one function, so every party derives them alike."""

from __future__ import annotations

import hashlib


def derived_seed(seed: int, rnd: int, purpose: str) -> int:
    """A 31-bit seed for `purpose` (a site id, "sites", "server-noise") in round `rnd`."""
    digest = hashlib.sha256(f"{seed}:{rnd}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1
