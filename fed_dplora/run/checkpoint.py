"""Server checkpoints: one file, written beside its target and renamed into place.

A checkpoint holds the global adapter tensors, every ledger's counts, the last finished
round, the census the privacy plan was built from, and (write-ahead) the round in
flight. Every random draw of the server is derived from (run seed, round), so the round
number restores the RNG state exactly. A crash at any point leaves either the previous
checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT_FILE = "checkpoint.npz"
_STATE_KEY = "__state__"


@dataclass
class Checkpoint:
    round: int  # last round whose update, charges and metrics are all committed
    arrays: dict[str, np.ndarray]
    ledgers: dict[str, dict[str, Any]]  # ledger kind -> Ledger.state()
    census: dict[str, Any]  # {"sizes": {site: n}, "labels": [...]}
    # Round sent to clients but not committed: {"round": r, "sample_charges": {...}}
    pending: dict[str, Any] | None = None
    stopped: str | None = None  # why the run ended early (budget), if it did
    lost_rounds: list[int] = field(default_factory=list)  # charged, never committed
    failed_rounds: list[int] = field(default_factory=list)  # below min-replies: no update
    declined: dict[str, str] = field(default_factory=dict)  # site -> why its limits refused
    # Sites no longer asked (failing, or declined) and failure streaks, by site id: a
    # resumed run asks the sites the interrupted one would have asked.
    excluded: list[str] = field(default_factory=list)
    failure_streaks: dict[str, int] = field(default_factory=dict)

    def save(self, folder: Path) -> Path:
        state = {"round": self.round, "ledgers": self.ledgers, "census": self.census,
                 "pending": self.pending, "stopped": self.stopped,
                 "lost_rounds": self.lost_rounds, "failed_rounds": self.failed_rounds,
                 "declined": self.declined, "excluded": self.excluded,
                 "failure_streaks": self.failure_streaks}
        buffer = io.BytesIO()
        np.savez(buffer, **self.arrays,
                 **{_STATE_KEY: np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)})
        target, tmp = folder / CHECKPOINT_FILE, folder / f".{CHECKPOINT_FILE}.tmp"
        with tmp.open("wb") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(folder)
        return target

    @staticmethod
    def exists(folder: Path) -> bool:
        return (folder / CHECKPOINT_FILE).is_file()

    @classmethod
    def load(cls, folder: Path) -> "Checkpoint":
        path = folder / CHECKPOINT_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from (a run saves "
                                    "one after its first round)")
        try:
            with np.load(path, allow_pickle=False) as saved:
                arrays = {k: saved[k] for k in saved.files if k != _STATE_KEY}
                state = json.loads(saved[_STATE_KEY].tobytes().decode())
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} is damaged ({err}); a run cannot resume from it: "
                             "restore it from a backup, or start a new run") from err
        return cls(state["round"], arrays, state["ledgers"], state["census"],
                   state["pending"], state["stopped"], state["lost_rounds"],
                   state.get("failed_rounds", []), state.get("declined", {}),
                   state.get("excluded", []), state.get("failure_streaks", {}))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
