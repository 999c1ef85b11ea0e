"""A site's own privacy ledger and limits: the guarantee does not rest on the coordinator.

Privacy: unit = one record of this site's training data (add/remove), across every run
that used the same data. The file holds, per dataset (a content hash of the training
records) and per run, how many DP-SGD steps the site took with each (q, sigma); the
site's epsilon is the composition of all of them (RDP, dp-accounting) at its own delta.
Before a round the site computes its epsilon after that round and declines it if it
would pass `max-epsilon`, or if the server asks for less noise than
`min-noise-multiplier`, or for no noise while a limit is set. A round is charged before
it trains (a crash afterwards cannot leave a release uncharged). The file is written
whole (temporary file, fsync, rename) under an exclusive lock: a SuperNode may run
several ClientApps at once.

    python -m fed_dplora.site_ledger show <file> [--delta 1e-5]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fed_dplora.privacy.events import dp_sgd_step, event_from_json, event_to_json
from fed_dplora.privacy.ledger import Ledger, sample_level_ledger
from fed_dplora.privacy.plan import MAX_AUTO_DELTA
from fed_dplora.privacy.report import max_pld_epsilon

log = logging.getLogger("fed_dplora.site_ledger")
TOTAL = "total"


class SiteDeclines(RuntimeError):
    """This round would pass a limit the site set for itself."""


@dataclass(frozen=True)
class SiteLimits:
    """Set by the hospital in its node config, not by the coordinator."""

    max_epsilon: float | None = None  # lifetime, for this dataset
    max_delta: float = MAX_AUTO_DELTA  # the delta at which the site's epsilon is computed
    min_noise_multiplier: float | None = None

    @property
    def any(self) -> bool:
        return self.max_epsilon is not None or self.min_noise_multiplier is not None


@dataclass(frozen=True)
class RoundAsk:
    """What the server asks this site to do in one round."""

    run: str
    sampling_probability: float
    noise_multiplier: float | None  # None: no sample-level DP
    steps: int


def dataset_key(texts: tuple[str, ...], labels: tuple[str, ...]) -> str:
    """SHA-256 of the training records: runs on the same data share one budget."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels):
        digest.update(f"{len(text)}:{text}\x1f{label}\x1e".encode())
    return digest.hexdigest()


class SiteLedger:
    def __init__(self, path: str | Path, limits: SiteLimits) -> None:
        self.path = Path(path)
        self.limits = limits

    def charge_or_decline(self, dataset: str, ask: RoundAsk) -> float:
        """Charge the round and return the site's epsilon after it, or raise
        `SiteDeclines` (nothing charged) when it would pass a limit."""
        with self._locked() as state:
            runs = state.setdefault(dataset, {})
            ledger = _ledger(runs, self.limits.max_delta)
            self._check(ledger, ask)
            if ask.noise_multiplier is not None:
                event = dp_sgd_step(ask.sampling_probability, ask.noise_multiplier)
                key = json.dumps(event_to_json(event))
                counts = runs.setdefault(ask.run, {})
                counts[key] = counts.get(key, 0) + ask.steps
                ledger.record(TOTAL, event, ask.steps)
            return ledger.epsilon(TOTAL)

    def spend(self, dataset: str) -> dict[str, float]:
        """Epsilon per run and in total for one dataset (RDP, at the site's delta)."""
        return self.epsilons(self.datasets().get(dataset, {}))

    def datasets(self) -> dict[str, dict[str, dict[str, int]]]:
        """{dataset: {run: {event (JSON): steps}}}, as the file holds it."""
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def epsilons(self, runs: dict[str, dict[str, int]]) -> dict[str, float]:
        ledger = _ledger(runs, self.limits.max_delta)
        return {**{run: ledger.epsilon(run) for run in runs}, TOTAL: ledger.epsilon(TOTAL)}

    def _check(self, ledger: Ledger, ask: RoundAsk) -> None:
        """Raise `SiteDeclines` if the round would pass a limit (`ledger`: spend so far)."""
        limits = self.limits
        if ask.noise_multiplier is None:
            if limits.any:
                raise SiteDeclines("the server asks for training without DP noise, and "
                                   "this site set privacy limits")
            return
        if (limits.min_noise_multiplier is not None
                and ask.noise_multiplier < limits.min_noise_multiplier):
            raise SiteDeclines(f"the server asks for noise multiplier "
                               f"{ask.noise_multiplier:.4f} < this site's "
                               f"min-noise-multiplier {limits.min_noise_multiplier:g}")
        if limits.max_epsilon is None:
            return
        after = ledger.epsilon_if(TOTAL, dp_sgd_step(ask.sampling_probability,
                                                     ask.noise_multiplier), ask.steps)
        if after > limits.max_epsilon:
            raise SiteDeclines(f"this round would take this site's data to epsilon "
                               f"{after:.4f} > its max-epsilon {limits.max_epsilon:g} (delta "
                               f"{limits.max_delta:g}, over all its runs)")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """The file's state under an exclusive lock; written back whole on success."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.datasets()
            yield state
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with tmp.open("w") as handle:
                handle.write(json.dumps(state, indent=1, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)


def _ledger(runs: dict[str, dict[str, int]], delta: float) -> Ledger:
    """A sample-level ledger with one account per run and their sum under `TOTAL`
    (which dominates every run, so a PLD report computes the total alone)."""
    ledger = sample_level_ledger(delta)
    for run, counts in runs.items():
        for key, count in counts.items():
            event = event_from_json(json.loads(key))
            ledger.record_many({run: (event, count), TOTAL: (event, count)})
    return ledger


def show(path: str, delta: float) -> str:
    """Each dataset's spend per run and in total: RDP, and PLD for the total."""
    site = SiteLedger(path, SiteLimits(max_delta=delta))
    lines = [f"{path} (epsilon at delta {delta:g})"]
    for dataset, runs in sorted(site.datasets().items()):
        eps = site.epsilons(runs)
        pld = max_pld_epsilon(_ledger(runs, delta))
        lines.append(f"dataset {dataset[:16]}: total epsilon {eps[TOTAL]:.4f} (RDP), "
                     f"{pld:.4f} (PLD)")
        lines += [f"  run {run}: {eps[run]:.4f} (RDP)" for run in sorted(runs)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fed_dplora.site_ledger",
                                     description="A site's privacy spend, per run and total")
    parser.add_argument("command", choices=["show"])
    parser.add_argument("file")
    parser.add_argument("--delta", type=float, default=MAX_AUTO_DELTA)
    args = parser.parse_args()
    print(show(args.file, args.delta))  # the command's output, not a log line


if __name__ == "__main__":
    main()
