"""Simulation overhead and the common Flower+Opacus pattern, measured side by side.

Three ways to run the same rounds (4 clients, FFA, sample-level DP, the demo data):

1. `flwr run` (ours): a real local SuperLink and Ray simulation, through
   `experiments.flwr_job`. Round wall times come from metrics.jsonl; start-up is the time
   from launching `flwr run` to the first round's start, on a SuperLink that a first
   small job already started (as in a sweep).
2. Pure compute (the baseline): the same clients' train + evaluate back to back in this
   process with one reused `LocalTrainer`, no Flower. Its rounds alternate with 3's.
3. The common pattern (Flower's Opacus example): every round and client, load the model,
   tokenize the data, build a new `PrivacyEngine` (DP optimizer and Poisson loader), train
   the same steps, evaluate.

Prints median seconds per round and the ratios: simulated / pure compute (overhead),
common pattern / ours (speed-up).

    python -m experiments.bench_round [--clients 4] [--rounds 4] [--local-steps 5]
        [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from experiments.flwr_job import LocalFederation
from fed_dplora.config import RunSpec, parse_run_config
from fed_dplora.data.site import load_simulated_sites
from fed_dplora.data.tokenize import tokenize
from fed_dplora.lora.adapters import trainable_arrays
from fed_dplora.lora.model import ModelRecipe, build_lora_model, load_tokenizer
from fed_dplora.privacy.plan import plan_sample_level
from fed_dplora.run.results import read_base_score, read_metrics
from fed_dplora.tasks import task_for
from fed_dplora.site.trainer import LocalTrainer, RoundPlan, evaluate_model

log = logging.getLogger("fed_dplora.bench_round")
CPU = torch.device("cpu")


def run_config(args, out: Path) -> dict:
    return {"num-server-rounds": args.rounds, "clients-per-round": args.clients,
            "local-steps": args.local_steps, "batch-size": args.batch,
            "physical-batch-size": args.batch, "output-dir": str(out), "run-name": "bench",
            "data.demo-records-per-site": args.records}


FLOOR_APP = Path(__file__).resolve().parent / "startup_floor"


def _timed_job(federation: LocalFederation, config: dict, app: Path | None = None
               ) -> tuple[float, Path]:
    """(wall-clock time at launch, run folder) of one job, run to completion."""
    launched = time.time()
    folder = (federation.run(config, app) if app else federation.run(config))
    return launched, folder


def startup(args, out: Path, federation: LocalFederation
            ) -> tuple[list[float], list[float], list[float], list[float]]:
    """Seconds from `flwr run` to the end of set-up (round 0, the base model's evaluation,
    starts), for the empty floor app to its census's end, and for ours to round 1's start
    and to the end of its 1-step round 1 (work deferred past start-up shows up there), in
    interleaved pairs on one running SuperLink."""
    ours, floor, round_1, first_round_end = [], [], [], []
    for rep in range(args.startup_repeats):
        launched, folder = _timed_job(
            federation, {**run_config(args, out), "num-server-rounds": 1, "local-steps": 1,
                         "run-name": f"startup-{rep}"})
        first = read_metrics(folder)[0]
        ours.append(read_base_score(folder)["started_at"] - launched)
        round_1.append(first["started_at"] - launched)
        first_round_end.append(first["started_at"] + first["wall_s"] - launched)
        launched, folder = _timed_job(
            federation, {"num-nodes": args.clients, "output-dir": str(out),
                         "run-name": f"floor-{rep}"}, FLOOR_APP)
        floor.append(json.loads((folder / "ready.json").read_text())["ready_at"] - launched)
    return ours, floor, round_1, first_round_end


def simulated(args, out: Path, federation: LocalFederation) -> list[float]:
    """Per-round wall seconds of a real `flwr run` with `args.clients` SuperNodes."""
    return [r["wall_s"] for r in read_metrics(federation.run(run_config(args, out)))]


class PureCompute:
    """Every client's train + evaluate, back to back, with one reused trainer."""

    def __init__(self, args, spec: RunSpec) -> None:
        splits, labels = load_simulated_sites(spec, args.clients)
        tokenizer = load_tokenizer(spec.model)
        self.data = [(tokenize(s.train, tokenizer, spec.model.max_length, labels),
                      tokenize(s.test, tokenizer, spec.model.max_length, labels))
                     for s in splits]
        self.trainer = LocalTrainer(ModelRecipe.from_spec(spec, len(labels)), CPU, True)
        self.sigma = plan_sample_level(spec.privacy.target_epsilon, None, args.batch,
                                       {str(i): len(s.train) for i, s in enumerate(splits)},
                                       args.rounds * args.local_steps).noise_multiplier
        self.arrays = trainable_arrays(self.trainer.model)
        self.args, self.spec = args, spec

    def round(self, rnd: int) -> float:
        start = time.perf_counter()
        for i, (train, test) in enumerate(self.data):
            plan = RoundPlan(self.args.local_steps, self.args.batch, self.args.batch,
                             self.spec.train.learning_rate, self.spec.train.optimizer,
                             self.sigma[str(i)], self.spec.privacy.max_grad_norm,
                             seed=rnd * 100 + i)
            self.trainer.train(self.arrays, plan, train)
            self.trainer.evaluate(self.arrays, test, 128)
        return time.perf_counter() - start


class CommonPattern:
    """The Flower+Opacus example habit: every round and client, rebuild everything."""

    def __init__(self, args, spec: RunSpec) -> None:
        self.splits, self.labels = load_simulated_sites(spec, args.clients)
        sizes = {str(i): len(s.train) for i, s in enumerate(self.splits)}
        self.sigma = plan_sample_level(spec.privacy.target_epsilon, None, args.batch, sizes,
                                       args.rounds * args.local_steps).noise_multiplier
        self.args, self.spec = args, spec

    def round(self, rnd: int) -> float:
        spec, args = self.spec, self.args
        start = time.perf_counter()
        for i, split in enumerate(self.splits):
            model = build_lora_model(ModelRecipe.from_spec(spec, len(self.labels)), CPU)
            tokenizer = load_tokenizer(spec.model)
            train = tokenize(split.train, tokenizer, spec.model.max_length, self.labels)
            test = tokenize(split.test, tokenizer, spec.model.max_length, self.labels)
            ids, mask, y = train.batch(list(range(len(train))), CPU)
            loader = DataLoader(TensorDataset(ids, mask, y), batch_size=args.batch)
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                        lr=spec.train.learning_rate, momentum=0.9)
            model, optimizer, loader = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=self.sigma[str(i)],
                max_grad_norm=spec.privacy.max_grad_norm)
            steps = 0
            while steps < args.local_steps:
                for batch_ids, batch_mask, batch_y in loader:
                    optimizer.zero_grad()
                    F.cross_entropy(model(batch_ids, batch_mask), batch_y).backward()
                    optimizer.step()
                    steps += 1
                    if steps == args.local_steps:
                        break
            evaluate_model(model._module, task_for(spec.task), test, 128, CPU)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--startup-repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    out = Path(tempfile.mkdtemp(prefix="fed-dplora-bench-round-"))
    spec = parse_run_config(run_config(args, out))
    log.info("%d clients x %d rounds x %d DP-SGD steps (batch %d), %d demo records/site, "
             "MiniLM FFA, %d torch threads", args.clients, args.rounds, args.local_steps,
             args.batch, args.records, torch.get_num_threads())
    with LocalFederation(args.clients) as federation:
        # A first small job starts the SuperLink (once per federation, as in a sweep).
        federation.run({**run_config(args, out), "num-server-rounds": 1, "local-steps": 1,
                        "run-name": "warm-up"})
        ours_startup, floor_startup, round_1, first_round_end = startup(args, out,
                                                                          federation)
        sim = simulated(args, out, federation)
    pure_runner, common_runner = PureCompute(args, spec), CommonPattern(args, spec)
    pure, common = [], []
    for rnd in range(args.rounds):  # interleaved, so machine noise hits both alike
        pure.append(pure_runner.round(rnd))
        common.append(common_runner.round(rnd))
    steady = statistics.median(sim[1:]) if len(sim) > 1 else sim[0]
    pure_round, common_round = statistics.median(pure[1:]), statistics.median(common[1:])
    log.info("%-44s %10s", "", "s/round")
    log.info("%-44s %10.2f", "flwr run simulation, rounds 2+ (median)", steady)
    log.info("%-44s %10.2f", "flwr run simulation, round 1 (cold clients)", sim[0])
    log.info("%-44s %10.2f", "pure compute, one process (median)", pure_round)
    log.info("%-44s %10.2f", "common pattern: rebuild every round (median)", common_round)
    log_startup(ours_startup, floor_startup, round_1, first_round_end)
    log.info("simulation overhead: simulated / pure compute = %.3f", steady / pure_round)
    log.info("common pattern / ours (pure) = %.2fx; common pattern / ours (simulated) "
             "= %.2fx", common_round / pure_round, common_round / steady)


def log_startup(ours: list[float], floor: list[float], round_1: list[float],
                first_round_end: list[float]) -> None:
    """Start-up against the empty app's, as medians of the interleaved repeats."""
    med = statistics.median
    log.info("start-up, `flwr run` to set-up done (round 0 starts; SuperLink running, "
             "median of %d): fed-dplora %.1f s, empty Flower app (floor) %.1f s, "
             "ours / floor %.2fx, ours - floor %.1f s", len(ours), med(ours), med(floor),
             med(ours) / med(floor), med(ours) - med(floor))
    log.info("per repeat, ours / floor: %s", ", ".join(
        f"{o / f:.2f}x" for o, f in zip(ours, floor)))
    log.info("`flwr run` to round 1 start (after round 0's evaluation): %.1f s; to the "
             "end of a 1-step round 1 (cold clients): %.1f s", med(round_1),
             med(first_round_end))


if __name__ == "__main__":
    main()
