"""What a site keeps between rounds of a method with site-local tensors (FedSA's B):
in the site's own storage, so it survives a crash of the site or of the server.

One folder per (run, site): `round-<r>.npz` holds the tensors after the site trained in
round r, written atomically. A round replayed after a crash (`resume=true`) starts
from the latest state of an earlier round, so the last two are kept.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np

KEPT = 2
_FILE = re.compile(r"round-(\d+)\.npz")


class SiteState:
    """A site's own tensors of one run, by round."""

    def __init__(self, root: Path, run_key: str, site: str) -> None:
        if not run_key:
            raise ValueError("a site's own state needs the run's key (run-key in the "
                             "round config): the server did not send one")
        digest = hashlib.sha256(f"{run_key}\0{site}".encode()).hexdigest()[:32]
        self.folder = Path(root) / digest

    def load(self, before_round: int) -> dict[str, np.ndarray] | None:
        """The tensors of the latest round before `before_round`; None if none."""
        rounds = [r for r in self._rounds() if r < before_round]
        if not rounds:
            return None
        with np.load(self.folder / f"round-{max(rounds)}.npz") as saved:
            return {name: saved[name] for name in saved.files}

    def save(self, server_round: int, arrays: dict[str, np.ndarray]) -> None:
        """Keep `arrays` as this round's (replacing a replayed round's), and the
        state of the one round before it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        tmp = self.folder / f".round-{server_round}.npz.tmp"
        with open(tmp, "wb") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.folder / f"round-{server_round}.npz")
        earlier = sorted(r for r in self._rounds() if r < server_round)
        for old in earlier[:-(KEPT - 1)]:
            (self.folder / f"round-{old}.npz").unlink()

    def _rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return [int(m.group(1)) for f in self.folder.iterdir()
                if (m := _FILE.fullmatch(f.name))]
