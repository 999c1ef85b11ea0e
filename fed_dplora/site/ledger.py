"""A site's own privacy ledger and limits: the guarantee does not rest on the coordinator.

Privacy: unit = one record of this site's data source, across every run that used it.
One account per data source (`fed_dplora.data.site.DataSource`: named by the node
config's `ledger-account`, else the site's data path, all records), whatever a run's
seed, record cap, validation fraction, task or columns, and whatever rows the file gains
later: every run reading the source charges the same account. The file holds, per
account and per run, how many rounds it charged, how many DP-SGD steps the site took
with each (q, sigma), and rounds that carried no sample-level noise (their epsilon is
infinite).

The site's n leaves it (census), so its guarantee is stated for replace-one neighbours:
`max-epsilon` is checked against the replace-one epsilon (dp-accounting's PLD, which
supports Poisson sampling under replace-one; its RDP accountant does not), and the
add/remove epsilon (RDP) is reported next to it. delta follows the plan's rule,
min(max-delta, 1 / (10 n)) with n the source's records. Before a round the site
computes its epsilon after that round and declines it if it would pass `max-epsilon`
(lifetime) or `max-run-epsilon` (this run), or the run's `max-rounds`, if the server
asks for less noise than `min-noise-multiplier`, or for no noise (or less than
`fed_dplora.site.limits.UNNOISED_BELOW`) unless the site accepts un-noised rounds
(`allow-unnoised`, then charged epsilon = infinity). A round that would take the account
past `MAX_ACCOUNT_STEPS` steps or `MAX_ACCOUNT_EVENTS` distinct events is declined
before any epsilon is computed, so no message holds the lock for long.
A round is charged before it trains (a crash afterwards cannot leave a release
uncharged). The file is written whole (temporary file, fsync, rename) under an exclusive
lock: a SuperNode may run several ClientApps at once.

    python -m fed_dplora.site.ledger show <file>
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dp_accounting as dpa

from fed_dplora.data.site import DataSource
from fed_dplora.privacy.accountants import LIVE_PLD_DISCRETIZATION
from fed_dplora.privacy.events import (NeighborRel, dp_sgd_step, event_from_json,
                                       event_to_json)
from fed_dplora.privacy.ledger import sample_level_ledger
from fed_dplora.privacy.plan import MAX_AUTO_DELTA, auto_delta
from fed_dplora.privacy.report import pld_epsilon
from fed_dplora.site.limits import (MAX_ACCOUNT_EVENTS, MAX_ACCOUNT_STEPS, UNNOISED_BELOW,
                                    SiteLimits, is_unnoised)

log = logging.getLogger("fed_dplora.site.ledger")
FILE_VERSION = 3  # 3 adds each run's count of rounds; version 2 files are read as is
READS_VERSIONS = (2, FILE_VERSION)
UNNOISED = "unnoised-rounds"  # a run's count of rounds without sample-level noise
ROUNDS = "rounds"  # a run's count of rounds charged


class SiteDeclines(RuntimeError):
    """This round would pass a limit the site set for itself."""


@dataclass(frozen=True)
class RoundAsk:
    """What the server asks this site to do in one round."""

    run: str
    sampling_probability: float
    noise_multiplier: float | None  # None: no sample-level DP
    steps: int


@dataclass(frozen=True)
class Spend:
    """An account's epsilon at its delta: replace-one (PLD, the limit's relation) and
    add/remove (RDP)."""

    replace_one: float
    add_remove: float
    delta: float


class SiteLedger:
    def __init__(self, path: str | Path, limits: SiteLimits) -> None:
        self.path = Path(path)
        self.limits = limits

    def charge_or_decline(self, source: DataSource, ask: RoundAsk) -> Spend:
        """Charge the round to `source`'s account and return its spend after it, or
        raise `SiteDeclines` (nothing charged) when it would pass a limit. A round
        that would take the account past the ledger's own bounds is refused before any
        epsilon is computed."""
        with self._locked() as accounts:
            account = accounts.setdefault(source.key, {"source": source.description,
                                                       "records": source.records, "runs": {}})
            # In simulation a record cap changes the count: the larger n, the smaller delta.
            account["records"] = max(account["records"], source.records)
            self._check(ask)
            counts = account["runs"].setdefault(ask.run, {})
            self._count(account, counts, ask)
            return self._checked_spend(account, ask.run)

    def _count(self, account: dict, counts: dict, ask: RoundAsk) -> None:
        """Add the round to its run's counts, within the run's rounds and the ledger's
        bounds (`SiteDeclines` otherwise)."""
        counts[ROUNDS] = counts.get(ROUNDS, 0) + 1
        limit = self.limits.max_rounds
        if limit is not None and counts[ROUNDS] > limit:
            raise SiteDeclines(f"this run asks for round {counts[ROUNDS]} of this site, "
                               f"past its max-rounds {limit}")
        if is_unnoised(ask.noise_multiplier):
            counts[UNNOISED] = counts.get(UNNOISED, 0) + 1
            return
        key = json.dumps(event_to_json(dp_sgd_step(ask.sampling_probability,
                                                   ask.noise_multiplier)))
        counts[key] = counts.get(key, 0) + ask.steps
        events = _event_counts(account["runs"])
        if sum(events.values()) > MAX_ACCOUNT_STEPS or len(events) > MAX_ACCOUNT_EVENTS:
            raise SiteDeclines(
                f"this round would take this site's ledger past {MAX_ACCOUNT_STEPS} DP-SGD "
                f"steps or {MAX_ACCOUNT_EVENTS} distinct (q, sigma) pairs for its data, "
                "more than the ledger accounts; it declines without computing epsilon")

    def _checked_spend(self, account: dict, run: str) -> Spend:
        """The account's spend, `SiteDeclines` past the lifetime or the run's limit."""
        spend = self.spend(account)
        for limit, key, of_run in ((self.limits.max_epsilon, "max-epsilon", False),
                                   (self.limits.max_run_epsilon, "max-run-epsilon", True)):
            if limit is None:
                continue
            value = (self.spend(account, run) if of_run and len(account["runs"]) > 1
                     else spend).replace_one
            if value > limit:
                raise SiteDeclines(f"this round would take this site's data to epsilon "
                                   f"{value:.4f} (replace-one) > its {key} {limit:g} "
                                   f"(delta {spend.delta:.3g}, "
                                   f"{'this run' if of_run else 'over all its runs'})")
        return spend

    def accounts(self) -> dict[str, dict]:
        """{account key: {"source", "records", "runs": {run: {event JSON: steps}}}}."""
        if not self.path.exists():
            return {}
        state = json.loads(self.path.read_text())
        if state.get("version") not in READS_VERSIONS:
            raise ValueError(f"{self.path}: a site ledger of another format (version "
                             f"{state.get('version')}, this fed-dplora reads versions "
                             f"{list(READS_VERSIONS)}); keep it, and give this version "
                             "another privacy-ledger file")
        return state["accounts"]

    def spend(self, account: dict, run: str | None = None) -> Spend:
        """Epsilon of the whole account, or of one `run` of it."""
        delta = min(self.limits.max_delta or MAX_AUTO_DELTA, auto_delta([account["records"]]))
        runs = account["runs"] if run is None else {run: account["runs"].get(run, {})}
        if any(steps.get(UNNOISED) for steps in runs.values()):
            return Spend(float("inf"), float("inf"), delta)
        events = run_events(runs)
        add_remove = _rdp_total(events, delta) if events else 0.0
        replace_one = (pld_epsilon(events, delta, NeighborRel.REPLACE_ONE,
                                   LIVE_PLD_DISCRETIZATION, rdp_epsilon=add_remove)
                       if events else 0.0)
        return Spend(replace_one, add_remove, delta)

    def _check(self, ask: RoundAsk) -> None:
        """Raise `SiteDeclines` for a round the site refuses whatever its spend: one
        without noise, or with less than `UNNOISED_BELOW` (un-noised), unless the site
        accepts such rounds; one with less than its `min-noise-multiplier`."""
        limits = self.limits
        if is_unnoised(ask.noise_multiplier):
            if not limits.allow_unnoised:
                raise SiteDeclines(
                    f"the server asks for a round without sample-level DP noise (noise "
                    f"multiplier {ask.noise_multiplier}, below {UNNOISED_BELOW} counts as "
                    "none); this site declines it (a site that accepts such rounds sets "
                    "allow-unnoised=true in its node config, and its epsilon becomes "
                    "infinite)")
            return
        if (limits.min_noise_multiplier is not None
                and ask.noise_multiplier < limits.min_noise_multiplier):
            raise SiteDeclines(f"the server asks for noise multiplier "
                               f"{ask.noise_multiplier:.4f} < this site's "
                               f"min-noise-multiplier {limits.min_noise_multiplier:g}")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """The accounts under an exclusive lock; written back whole on success."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            accounts = self.accounts()
            yield accounts
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with tmp.open("w") as handle:
                state = {"version": FILE_VERSION, "accounts": accounts}
                handle.write(json.dumps(state, indent=1, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)


def run_events(runs: dict[str, dict]) -> tuple[tuple[dpa.DpEvent, int], ...]:
    """The DP events of `runs` (an account's, or some of them) and their steps, composed
    over the runs in a fixed order (their un-noised rounds left out)."""
    return tuple(sorted(((event_from_json(json.loads(k)), n) for k, n in
                         _event_counts(runs).items() if n), key=repr))


def _event_counts(runs: dict[str, dict]) -> Counter:
    """{event JSON: steps} over `runs` (their rounds and un-noised rounds left out)."""
    counts: Counter = Counter()
    for steps in runs.values():
        counts.update({k: n for k, n in steps.items() if k not in (ROUNDS, UNNOISED)})
    return counts


def _rdp_total(events: tuple[tuple[dpa.DpEvent, int], ...], delta: float) -> float:
    """Add/remove epsilon of the events composed (RDP)."""
    ledger = sample_level_ledger(delta)
    for event, count in events:
        ledger.record("total", event, count)
    return ledger.epsilon("total")


def show(path: str) -> str:
    """Each account's spend in total and per run."""
    site = SiteLedger(path, SiteLimits())
    lines = [f"{path}"]
    for key, account in sorted(site.accounts().items()):
        total = site.spend(account)
        lines.append(f"account {key[:16]} ({account['source']}, {account['records']} "
                     f"records, delta {total.delta:.3g}): epsilon {total.replace_one:.4f} "
                     f"replace-one (PLD), {total.add_remove:.4f} add/remove (RDP)")
        for run in sorted(account["runs"]):
            spend = site.spend(account, run)
            lines.append(f"  run {run}: {spend.replace_one:.4f} replace-one, "
                         f"{spend.add_remove:.4f} add/remove")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fed_dplora.site.ledger",
                                     description="A site's privacy spend, per run and total")
    parser.add_argument("command", choices=["show"])
    parser.add_argument("file")
    args = parser.parse_args()
    print(show(args.file))  # the command's output, not a log line


if __name__ == "__main__":
    main()
