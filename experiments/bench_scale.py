"""Scale: many simulated sites through `flwr run`, memory per round and time per client.

FFA, sample-level DP, small demo sites, on a real local SuperLink and Ray simulation
(`experiments.flwr_job`). Four measurements:

1. Memory: for each federation size in `--sites`, `--per-round` sampled a round,
   `--rounds` rounds. The resident memory of the SuperLink's whole process tree (the
   simulation and every Ray worker) is sampled every 0.5 s; each round's value is the
   largest sample while it ran. Flat after round 2 means no per-site or per-round
   growth (target: <= 10%).
2. What grows with the federation: with several sizes in `--sites` (run one after the
   other, same settings), the census (nodes and census, round 0's `census_s`), the
   median wall and server time of rounds 2 to the end, and each size's ratio to the
   first (target: per-round wall time within 1.2x at the same sites a round).
   `--evaluate-sites K` evaluates K sampled sites a round and not every site in the
   last round (`evaluation.sites`, `evaluation.final-all=false`); 0: every site.
3. Time against sampled sites: short runs with `--compare` sites a round (on the first
   size). The train phase (the server's wait for the train replies) should grow in
   proportion.
4. The server's own time per round: wall time less its waits for train and evaluate
   replies (`train_s`, `evaluate_s` in metrics.jsonl).

    python -m experiments.bench_scale [--sites 100 1000] [--per-round 10] [--rounds 20]
        [--evaluate-sites 10] [--compare 10 20 50 | --compare]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil

from experiments.flwr_job import LocalFederation
from fed_dplora.run.results import read_base_score, read_metrics

log = logging.getLogger("fed_dplora.bench_scale")


class TreeMemory:
    """Resident memory of a process and all its descendants, and the CPU time of
    Flower's simulation engine (the `flwr-simulation` process), sampled in the background."""

    def __init__(self, pattern: str, period_s: float = 0.5) -> None:
        self.pattern, self.period_s = pattern, period_s
        self.samples: list[tuple[float, float, float]] = []  # (UNIX time, MB, engine CPU s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            pids = subprocess.run(["pgrep", "-f", self.pattern], capture_output=True,
                                  text=True).stdout.split()
            total = engine_cpu = 0.0
            for pid in pids:
                try:
                    root = psutil.Process(int(pid))
                    tree = [root, *root.children(True)]
                    total += sum(p.memory_info().rss for p in tree)
                    engine_cpu += sum(sum(p.cpu_times()[:2]) for p in tree
                                      if "flwr-simulation" in " ".join(p.cmdline()))
                except psutil.Error:
                    continue  # a process ended while we looked
            self.samples.append((time.time(), total / 2**20, engine_cpu))

    def peak_between(self, start: float, end: float) -> float:
        return max((mb for t, mb, _ in self.samples if start <= t <= end),
                   default=float("nan"))

    def engine_cpu_between(self, start: float, end: float) -> float:
        """CPU seconds the simulation engine used from `start` to `end` (nearest samples)."""
        inside = [cpu for t, _, cpu in self.samples if start <= t <= end]
        return inside[-1] - inside[0] if len(inside) > 1 else float("nan")


def run_config(args, out: Path, name: str, per_round: int, rounds: int) -> dict:
    sampled_evaluation = ({"evaluation.sites": args.evaluate_sites,
                           "evaluation.final-all": False} if args.evaluate_sites else {})
    return {"num-server-rounds": rounds, "clients-per-round": per_round,
            "local-steps": args.local_steps, "batch-size": args.batch,
            "physical-batch-size": args.batch, "data.demo-records-per-site": args.records,
            "output-dir": str(out), "run-name": name, **sampled_evaluation,
            "privacy.target-epsilon": 1000.0}  # room for every round at any sampling


def memory_per_round(args, out: Path, sites: int) -> tuple[list[dict], dict]:
    """Each round's peak memory and times at `sites` sites, and round 0's row."""
    with LocalFederation(sites) as federation:
        with TreeMemory(f"flower-superlink.*{federation.home}") as memory:
            folder = federation.run(run_config(args, out, f"memory-{sites}",
                                               args.per_round, args.rounds))
    rows = read_metrics(folder)
    return [{"round": r["round"], "rss_mb": memory.peak_between(
                r["started_at"], r["started_at"] + r["wall_s"]),
             "engine_cpu_s": memory.engine_cpu_between(r["started_at"],
                                                       r["started_at"] + r["wall_s"]),
             "wall_s": r["wall_s"], "train_s": r["train_s"],
             "evaluate_s": r["evaluate_s"] or 0.0,  # a round that does not evaluate
             "server_s": r["wall_s"] - r["train_s"] - (r["evaluate_s"] or 0.0)}
            for r in rows], read_base_score(folder)


def size_summary(sites: int, rounds: list[dict], base: dict) -> dict:
    """What one federation size cost: census, median round from round 2, memory drift."""
    later = rounds[1:]
    return {"sites": sites, "census_s": base["census_s"],
            "wall_s": statistics.median(r["wall_s"] for r in later),
            "server_s": statistics.median(r["server_s"] for r in later),
            "evaluate_s": statistics.median(r["evaluate_s"] for r in later),
            "engine_share": statistics.median(r["engine_cpu_s"] / r["wall_s"] for r in later),
            "rss_growth": rounds[-1]["rss_mb"] / rounds[1]["rss_mb"] - 1}


def time_per_sampled_site(args, out: Path) -> list[dict]:
    results = []
    with LocalFederation(args.sites[0]) as federation:
        for per_round in args.compare:
            rows = read_metrics(federation.run(run_config(
                args, out, f"per-round-{per_round}", per_round, args.compare_rounds)))[1:]
            train = statistics.median(r["train_s"] for r in rows)
            results.append({"per_round": per_round, "train_s": train,
                            "train_s_per_site": train / per_round,
                            "evaluate_s": statistics.median(r["evaluate_s"] for r in rows),
                            "server_s": statistics.median(
                                r["wall_s"] - r["train_s"] - r["evaluate_s"] for r in rows)})
    return results


def report_sizes(sizes: list[dict]) -> None:
    """One line per federation size, with its ratio to the first size."""
    first = sizes[0]
    log.info("sites | census s | round wall s (median) | server s | evaluate wait s | "
             "engine CPU / wall | RSS growth | wall / %d sites | census / %d sites",
             first["sites"], first["sites"])
    for r in sizes:
        log.info("%5d | %8.1f | %21.2f | %8.3f | %15.2f | %17.2f | %+9.1f%% | %15.2fx | "
                 "%15.2fx", r["sites"], r["census_s"], r["wall_s"], r["server_s"],
                 r["evaluate_s"], r["engine_share"], 100 * r["rss_growth"],
                 r["wall_s"] / first["wall_s"], r["census_s"] / first["census_s"])


def report_rounds(memory: list[dict]) -> None:
    log.info("round | peak RSS MB | wall s | train wait s | evaluate wait s | server s | "
             "engine CPU s")
    for r in memory:
        log.info("%5d | %11.0f | %6.1f | %12.1f | %15.1f | %8.2f | %12.2f", r["round"],
                 r["rss_mb"], r["wall_s"], r["train_s"], r["evaluate_s"], r["server_s"],
                 r["engine_cpu_s"])
    base = memory[1]["rss_mb"]  # after round 2: every worker has built its trainer
    log.info("RSS growth after round 2: %+.1f%% (round 2 %.0f MB -> last round %.0f MB)",
             100 * (memory[-1]["rss_mb"] / base - 1), base, memory[-1]["rss_mb"])


def report_timing(timing: list[dict]) -> None:
    log.info("sites a round | train wait s (median) | per site | evaluate wait s | server s")
    for r in timing:
        log.info("%13d | %20.2f | %8.3f | %15.1f | %8.2f", r["per_round"], r["train_s"],
                 r["train_s_per_site"], r["evaluate_s"], r["server_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[100],
                        help="federation sizes, run one after the other")
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--evaluate-sites", type=int, default=0,
                        help="sites evaluated a round (0: every site, every round)")
    parser.add_argument("--compare", type=int, nargs="*", default=[10, 20, 50])
    parser.add_argument("--compare-rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=100, help="demo records per site")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sizes = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for sites in args.sites:
            memory, base = memory_per_round(args, Path(tmp), sites)
            log.info("%d sites:", sites)
            report_rounds(memory)
            sizes.append(size_summary(sites, memory, base))
        timing = time_per_sampled_site(args, Path(tmp)) if args.compare else []
    if timing:
        report_timing(timing)
    report_sizes(sizes)


if __name__ == "__main__":
    main()
