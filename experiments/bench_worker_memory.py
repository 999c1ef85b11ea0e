"""One simulated worker's memory over its life, with and without handing freed memory back.

    python -m experiments.bench_worker_memory [--sites 100] [--rounds 16]

Runs the same worker's life twice, side by side in two processes (same machine load):
each round, 10 of `--sites` demo sites visit it, half training 2 DP-SGD steps of
expected batch 16 and half evaluating, as in bench_scale (MiniLM, 100 records a site).
One process calls `release_freed_memory` after each visit, as the ClientApp does; the
other does not. Prints each round's resident memory, the growth from round 2 to the
last round of both, and the share of the trimming process's time spent trimming.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable

import psutil

from fed_dplora.ops.memory import release_freed_memory

log = logging.getLogger("fed_dplora.bench_worker_memory")
PER_ROUND = 10


def rss_mb() -> float:
    """This process's resident memory, MB."""
    return psutil.Process().memory_info().rss / 2**20


def worker_life(sites: int, rounds: int, trim: bool,
                model: str = "all-MiniLM-L6-v2") -> tuple[list[float], float]:
    """Resident MB after each round of one worker's life, and the share of its time
    from round 2 on (after the imports and the model build) spent trimming."""
    visit = _visitor(model, sites)
    draw, memory, trimming, started = random.Random(0), [], 0.0, None
    for rnd in range(1, rounds + 1):
        started = time.perf_counter() if rnd == 2 else started
        for site in draw.sample(range(sites), min(PER_ROUND, sites)):
            visit(site, rnd)
            if trim:
                before = time.perf_counter()
                release_freed_memory()
                trimming += time.perf_counter() - before if started else 0.0
        memory.append(rss_mb())
    elapsed = time.perf_counter() - started if started else 0.0
    return memory, trimming / elapsed if elapsed else 0.0


def _visitor(model: str, sites: int) -> Callable[[int, int], None]:
    """A site's visit to the worker: 2 DP-SGD steps (odd sites) or an evaluation."""
    from clients import client_app, local_site
    from fed_dplora.config.parse import parse_run_config
    from fed_dplora.data.site import SitePlacement
    from fed_dplora.lora.adapters import trainable_arrays
    from strategies import wire as p
    spec = parse_run_config({"model.name": model, "local-steps": 2,
                             "data.demo-records-per-site": 100, "batch-size": 16,
                             "physical-batch-size": 16})
    shared: dict = {}  # the label set and the global tensors, from the first site

    def visit(site: int, rnd: int) -> None:
        placement = SitePlacement(site, sites)
        splits = client_app._site(spec, placement)
        if "labels" not in shared:
            shared["labels"] = tuple(sorted(set(splits.train.labels) | set(splits.test.labels)))
        trainer, (train, test, _) = local_site.prepare(spec, placement, splits,
                                                       shared["labels"])
        if "arrays" not in shared:
            shared["arrays"] = trainable_arrays(trainer.model)
        if site % 2:
            trainer.train(shared["arrays"], local_site.round_plan(spec, {
                p.NOISE_MULTIPLIER: 1.0, p.ROUND_SEED: rnd * 10_000 + site, p.ROUND: rnd},
                True), train)
        else:
            trainer.evaluate(shared["arrays"], test, client_app.EVAL_BATCH)
    return visit


def growth(memory: list[float]) -> float:
    """Resident memory at the last round over round 2's, minus 1."""
    return memory[-1] / memory[1] - 1


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_worker_memory")
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--trim", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.trim:  # one side of the comparison, in its own process
        sys.stdout.write(json.dumps(worker_life(args.sites, args.rounds,
                                                args.trim == "on")))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a Ray worker of 1 CPU
    sides = {trim: subprocess.Popen(
        [sys.executable, "-m", "experiments.bench_worker_memory", "--sites",
         str(args.sites), "--rounds", str(args.rounds), "--trim", trim],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        for trim in ("off", "on")}
    results = {trim: json.loads(proc.communicate()[0]) for trim, proc in sides.items()}
    memory = {trim: result[0] for trim, result in results.items()}
    log.info("round | RSS MB, no trim | RSS MB, trim after each visit")
    for rnd, (off, on) in enumerate(zip(memory["off"], memory["on"]), start=1):
        log.info("%5d | %14.0f | %29.0f", rnd, off, on)
    log.info("growth from round 2: no trim %+.1f%%, trim %+.1f%%; last round: trim / no "
             "trim = %.2f; time spent trimming (rounds 2+): %.2f%%",
             100 * growth(memory["off"]), 100 * growth(memory["on"]),
             memory["on"][-1] / memory["off"][-1], 100 * results["on"][1])


if __name__ == "__main__":
    main()
