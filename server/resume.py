"""Opening a run folder, or resuming one: the planned sites, the ledgers, and the charge
of a round a crash left in flight."""

from __future__ import annotations

import json
import logging
import secrets
from datetime import datetime

from fed_dplora.run.checkpoint import Checkpoint
from fed_dplora.config import RunSpec
from fed_dplora.privacy.central import CentralAccountant
from fed_dplora.run.results import RunFolder
from server.census import Census
from strategies.screening import ClientFailure

log = logging.getLogger("fed_dplora.server")
RUN_KEY_FILE = "run_key.json"


def open_run(spec: RunSpec, run_id: int, census: Census
             ) -> tuple[RunFolder, Checkpoint | None]:
    """A new run folder, or (resume) the named one and its last checkpoint."""
    name = spec.run_name or _run_name(spec, run_id)
    if not spec.resume:
        check_sites(spec, census)
        run = RunFolder.create(spec.output_dir, name,
                               {**spec.to_dict(), "label_names": list(census.labels)})
        log.info("run folder: %s (continue it after a crash with resume=true "
                 "run-name=\"%s\")", run.path.resolve(), name)
        return run, None
    run = RunFolder.open(spec.output_dir, name)
    saved = run.read_json("config.json")
    saved.pop("label_names", None)
    ours = json.loads(json.dumps({**spec.to_dict(), "resume": saved.get("resume")}))
    if saved != ours:
        changed = sorted(k for k in ours if saved.get(k) != ours[k])
        raise ValueError(f"resume: run-config differs from {run.path}/config.json in "
                         f"{changed}; a resumed run must use the same configuration")
    if not Checkpoint.exists(run.path):
        # The write-ahead checkpoint precedes any training: nothing was spent yet, and
        # the run starts as a fresh one would.
        check_sites(spec, census)
        run.truncate_rounds(-1)  # round 0's samples, if the crash came after them
        log.info("resuming %s from the start: it has no checkpoint yet", run.path.resolve())
        return run, None
    checkpoint = Checkpoint.load(run.path)
    run.truncate_rounds(checkpoint.round)
    log.info("resuming %s after round %d", run.path.resolve(), checkpoint.round)
    return run, checkpoint


def run_key(run: RunFolder) -> str:
    """The run folder's random key, kept across resumes: a site names its own state of
    the run by it (`fed_dplora.site.state`). Written before any training."""
    if (run.path / RUN_KEY_FILE).exists():
        return run.read_json(RUN_KEY_FILE)["run_key"]
    key = secrets.token_hex(16)
    run.write_json(RUN_KEY_FILE, {"run_key": key})
    return key


def check_sites(spec: RunSpec, census: Census) -> None:
    """Enough sites for a round, each with at least one logical batch of records."""
    if len(census.sites) < spec.clients_per_round:
        raise ClientFailure(f"clients-per-round={spec.clients_per_round} but only "
                            f"{len(census.sites)} site(s) answered the census")
    small = {s: n for s, n in census.sizes.items() if n < spec.train.batch_size}
    if small:
        raise ClientFailure(
            f"site(s) {small} hold fewer training records than batch-size="
            f"{spec.train.batch_size}: every step would take all of them (q = 1, no "
            "amplification by sampling); lower batch-size below the smallest site")


def planned_census(spec: RunSpec, census: Census, checkpoint: Checkpoint | None) -> Census:
    """The sites the privacy plan is built for: this census, or on resume the
    checkpoint's. A resumed run goes on without a site that left, when min-replies can
    still be met; a site whose dataset size changed, or one the run never planned
    for, is refused by name (its q and sigma were planned for other data)."""
    if checkpoint is None:
        return census
    sizes = checkpoint.census["sizes"]
    changed = sorted(s for s in census.sizes if s in sizes and census.sizes[s] != sizes[s])
    unknown = sorted(set(census.sizes) - set(sizes))
    if changed or unknown:
        raise ClientFailure(
            f"resume: site(s) {changed} now hold a different number of training records "
            f"and site(s) {unknown} were not part of the run; their sampling rate and "
            "noise were planned for other data: start a new run")
    departed = sorted(set(sizes) - set(census.sizes))
    needed = spec.failure.min_replies or 1
    if len(census.sizes) < needed:
        raise ClientFailure(f"resume: {len(census.sizes)} of the run's sites are connected, "
                            f"min-replies={needed}")
    if departed:
        log.warning("resume: site(s) %s are gone; the run goes on without them", departed)
    return Census(census.node_of, dict(sizes), tuple(checkpoint.census["labels"]),
                  census.randomness, census.share_metrics, census.eval_sizes)


def restore(checkpoint: Checkpoint, accountant: CentralAccountant, secure: bool
            ) -> Checkpoint:
    """Ledgers from the checkpoint, and the charge of a round a crash left in flight."""
    accountant.restore(checkpoint.ledgers)
    pending = checkpoint.pending
    if pending and pending["round"] > checkpoint.round:
        _charge_in_flight(pending, accountant, secure, checkpoint)
        checkpoint.pending = None
    return checkpoint


def _charge_in_flight(pending: dict, accountant: CentralAccountant, secure: bool,
                      checkpoint: Checkpoint) -> None:
    """A round in flight replays bit for bit only where every party drew seeded
    randomness. Whatever used fresh randomness may have released something that will
    not repeat, so it is charged: a fresh site's DP-SGD steps (it was asked to train),
    and the client-level round if the aggregate left the server (`released`)."""
    charges = pending["sample_charges"]
    fresh = sorted(charges) if secure else pending.get("fresh_sites", [])
    accountant.charge_planned({site: charges[site] for site in fresh if site in charges})
    released = bool(pending.get("released")) and (secure or bool(fresh))
    if released:
        accountant.charge_client_round()
    if fresh or released:
        checkpoint.lost_rounds.append(pending["round"])
        log.warning("round %d was interrupted after fresh randomness was used (sites %s, "
                    "aggregate %s): that is charged and the round runs again",
                    pending["round"], fresh, "released" if released else "not released")
    else:
        log.info("round %d was interrupted; replaying it with the same seeds",
                 pending["round"])


def _run_name(spec: RunSpec, run_id: int) -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{spec.method}-{spec.privacy.level}-{run_id}"
