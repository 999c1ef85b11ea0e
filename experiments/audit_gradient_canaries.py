"""A white-box one-run audit of the sites' DP-SGD: Dirac gradient canaries, each scored
on its own site's uploads (Steinke, Nasr and Jagielski, NeurIPS 2023, section 6).

The black-box audit (`experiments.audit_one_run`) scores text canaries by their loss
under the final model; with SGD at 0.1 and clipping at 1.0 its positive controls (sigma
/ 10, sigma / 1000) bounded nothing, so it has no power in this pipeline. Here each of m
canaries is a record whose clipped gradient is the adversary's choice: `max_grad_norm`
on one coordinate of the trained LoRA tensors, a coordinate of its own, at a site of
its own. Each is included with probability 1/2; an included canary joins its site's
Poisson batches with the site's sampling probability q, like any record, so the
ledger's (epsilon, delta) covers it. Clean records keep their sites whatever the
canaries are (they never enter the data). The sites run the library's own local
training (`LocalTrainer`: Opacus per-sample gradients, clipping, noise, SGD) and the
server averages what they upload, in this process, without Flower. A canary's score is
how far its site's uploads moved its coordinate against the gradient, summed over
rounds; the auditor guesses "in" for the highest scores and "out" for the lowest, and
`experiments.audit_one_run.audit` turns the correct guesses into a 95% lower bound.

    python -m experiments.audit_gradient_canaries [--canaries 1000]
        [--clean-records 2000] [--runs eps1 sigma/10 sigma/1000] [--seeds 0 1 2]
        [--out experiments/results/audit_gradient_canaries]

The bound must sit below the ledger's epsilon; if it does not, that is a privacy bug.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clients.local_site import round_plan
from experiments.audit_one_run import (CONFIDENCE, CONTROLS, GUESSES, audit, highest_bound,
                                       prepare, run_summaries)
from fed_dplora.aggregation import weighted_mean
from fed_dplora.config import RunSpec, parse_run_config
from fed_dplora.data.site import load_simulated_sites
from fed_dplora.data.tokenize import TokenizedData, tokenize
from fed_dplora.dp.engine import DpSgdAccumulator, StepStats
from fed_dplora.lora.adapters import global_arrays
from fed_dplora.lora.model import ModelRecipe, load_tokenizer
from fed_dplora.methods import method_for
from fed_dplora.privacy.events import sampling_probability
from fed_dplora.privacy.ledger import sample_level_ledger
from fed_dplora.privacy.plan import SampleLevelPlan, plan_sample_level
from fed_dplora.site.trainer import LocalTrainer, RoundPlan, TrainReport
from strategies import wire

log = logging.getLogger("fed_dplora.audit_gradient_canaries")
CPU = torch.device("cpu")
EPS1 = 1.0
UNBOUNDED = 1e12  # a control's target: only its noise multiplier matters
RUNS = ("eps1", *CONTROLS)
# The black-box audit's DP runs' training, at its --dp-learning-rate 0.1
TRAINING = {"batch-size": 64, "physical-batch-size": 64, "local-steps": 10,
            "optimizer": "sgd", "learning-rate": 0.1, "privacy.max-grad-norm": 1.0}


@dataclass(frozen=True)
class Canaries:
    """Per canary: its site, the trained tensor and flat coordinate it pushes, and
    whether it is in."""

    site: np.ndarray
    tensor: tuple[str, ...]
    coordinate: np.ndarray
    included: np.ndarray

    def at(self, site: int) -> list[tuple[str, int]]:
        """The (tensor, coordinate) of this site's included canaries."""
        return [(self.tensor[i], int(self.coordinate[i])) for i in range(len(self.site))
                if self.site[i] == site and self.included[i]]


def draw_canaries(count: int, sites: int, shapes: dict[str, tuple[int, ...]], seed: int
                  ) -> Canaries:
    """`count` canaries on distinct coordinates of the tensors in `shapes`, each at a
    uniformly drawn site and in with probability 1/2."""
    rng = np.random.default_rng(seed)
    names = sorted(shapes)
    sizes = np.array([int(np.prod(shapes[n])) for n in names])
    flat = rng.choice(int(sizes.sum()), size=count, replace=False)
    which = np.searchsorted(np.cumsum(sizes), flat, side="right")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return Canaries(rng.integers(sites, size=count), tuple(names[w] for w in which),
                    flat - starts[which], rng.random(count) < 0.5)


class CanaryAccumulator:
    """A DP-SGD accumulator whose logical batches also hold canary records: before the
    noise, each of `pushes` joins the clipped sum with probability q, as a gradient of
    norm `max_grad_norm` on its own coordinate."""

    def __init__(self, inner: DpSgdAccumulator, pushes: list[tuple[str, int]],
                 probability: float, rng: np.random.Generator) -> None:
        index = {name.removeprefix("_module."): i
                 for i, (name, _) in enumerate(inner.named_params)}
        self.inner = inner
        self.pushes = [(index[name], coordinate) for name, coordinate in pushes]
        self.probability = probability
        self.rng = rng
        self.sampled = 0

    @property
    def steps(self) -> int:
        return self.inner.steps

    def begin(self) -> None:
        self.inner.begin()

    def add_physical_batch(self, batch_size: int) -> None:
        self.inner.add_physical_batch(batch_size)

    def finish(self) -> StepStats:
        drawn = self.rng.random(len(self.pushes)) < self.probability
        # Into the clipped sum, where a real record's clipped gradient goes (the
        # accumulator's own state: nothing outside this audit writes there).
        sums = self.inner._sums
        for (tensor, coordinate), inside in zip(self.pushes, drawn):
            if inside:
                sums[tensor].view(-1)[coordinate] += self.inner.config.max_grad_norm
        self.sampled += int(drawn.sum())
        return self.inner.finish()


class CanaryTrainer(LocalTrainer):
    """The library's local trainer, with `pushes` (this round's site's canaries) in
    every logical batch it takes, each sampled at the site's own q."""

    def __init__(self, recipe: ModelRecipe, seed: int) -> None:
        super().__init__(recipe, CPU, private=True)
        self.pushes: list[tuple[str, int]] = []
        self.rng = np.random.default_rng(seed)
        self.probability = 0.0

    def train(self, arrays: dict[str, np.ndarray], plan: RoundPlan, data: TokenizedData,
              kept: dict[str, np.ndarray] | None = None
              ) -> tuple[dict[str, np.ndarray], TrainReport]:
        self.probability = sampling_probability(plan.batch_size, len(data))
        return super().train(arrays, plan, data, kept)

    def _accumulator(self, plan: RoundPlan, zero_nonfinite: bool = False
                     ) -> CanaryAccumulator:
        return CanaryAccumulator(super()._accumulator(plan, zero_nonfinite), self.pushes,
                                 self.probability, self.rng)


@dataclass
class Federation:
    """The sites' tokenized data and the run's spec, one trainer for all of them."""

    spec: RunSpec
    train: list[TokenizedData]
    test: list[TokenizedData]
    recipe: ModelRecipe

    @classmethod
    def load(cls, folder: Path, sites: int, seed: int) -> "Federation":
        spec = parse_run_config({
            "data.path": str(folder.resolve()), "data.partitioner": "natural",
            "data.partition-column": "site", "model.max-length": 32, "seed": seed,
            "privacy.level": "sample", **TRAINING})
        splits, labels = load_simulated_sites(spec, sites)
        tokenizer = load_tokenizer(spec.model)
        def tokens(data):
            return tokenize(data, tokenizer, spec.model.max_length, labels)
        return cls(spec, [tokens(s.train) for s in splits], [tokens(s.test) for s in splits],
                   ModelRecipe.from_spec(spec, len(labels)))

    def sizes(self) -> dict[str, int]:
        return {str(i): len(data) for i, data in enumerate(self.train)}

    def plan(self, rounds: int, noise_multiplier: float | None) -> SampleLevelPlan:
        """eps1's calibrated plan (None), or a control's with this noise multiplier."""
        target = EPS1 if noise_multiplier is None else UNBOUNDED
        return plan_sample_level(target, None, self.spec.train.batch_size, self.sizes(),
                                 rounds * self.spec.train.local_steps, noise_multiplier)


def train_and_score(federation: Federation, plan: SampleLevelPlan, canaries: Canaries,
                    rounds: int, seed: int) -> tuple[np.ndarray, CanaryTrainer, dict]:
    """Every round, every site trains from the global tensors; each canary's score is
    minus the change its site's upload made to its coordinate, summed over rounds."""
    trainer = CanaryTrainer(federation.recipe, seed)
    arrays = global_arrays(trainer.model, method_for(federation.recipe.method))
    scores = np.zeros(len(canaries.site))
    for rnd in range(1, rounds + 1):
        uploads, weights = [], []
        for site, data in enumerate(federation.train):
            trainer.pushes = canaries.at(site)
            config = {wire.NOISE_MULTIPLIER: plan.noise_multiplier[str(site)],
                      wire.ROUND_SEED: seed * 10_000 + rnd * 100 + site, wire.ROUND: rnd}
            upload, report = trainer.train(  # the plan a site builds from the server's
                arrays, round_plan(federation.spec, config, fresh_randomness=False), data)
            for i in np.flatnonzero(canaries.site == site):
                name, coordinate = canaries.tensor[i], canaries.coordinate[i]
                scores[i] -= (upload[name].flat[coordinate] - arrays[name].flat[coordinate])
            uploads.append(upload)
            weights.append(report.num_examples)
        arrays = {**arrays, **weighted_mean(uploads, weights)}
    return scores, trainer, arrays


def ledger_epsilon(plan: SampleLevelPlan, steps: int) -> float:
    """The largest site's epsilon after `steps` DP-SGD steps, as the run's ledger
    charges them."""
    ledger = sample_level_ledger(plan.delta)
    for site in plan.noise_multiplier:
        ledger.record(site, plan.step_event(site), steps)
    return ledger.max_epsilon()


def federated_accuracy(federation: Federation, trainer: CanaryTrainer,
                       arrays: dict[str, np.ndarray]) -> float:
    """The global tensors' accuracy over every site's test records."""
    reports = [trainer.evaluate(arrays, data, 128) for data in federation.test]
    return sum(r.accuracy * r.weight for r in reports) / sum(r.weight for r in reports)


def audit_run(federation: Federation, run: str, eps1_sigma: float, canaries: Canaries,
              args: argparse.Namespace, seed: int) -> dict:
    """Train one run (eps1, or a control at its share of eps1's sigma), audit it."""
    scale = CONTROLS.get(run)
    plan = federation.plan(args.rounds, None if scale is None else scale * eps1_sigma)
    scores, trainer, arrays = train_and_score(federation, plan, canaries, args.rounds, seed)
    steps = args.rounds * federation.spec.train.local_steps
    included = canaries.included
    accuracy = federated_accuracy(federation, trainer, arrays)
    return {"run": run, "seed": seed, "sigma": max(plan.noise_multiplier.values()),
            "epsilon_ledger": ledger_epsilon(plan, steps), "delta": plan.delta,
            "nominal_epsilon": EPS1, "test_accuracy": accuracy,
            "canaries": len(included), "included": int(included.sum()),
            "score_in": float(scores[included].mean()),
            "score_out": float(scores[~included].mean()),
            **audit(-scores, included, plan.delta)}


def audit_seed(args: argparse.Namespace, seed: int) -> list[dict]:
    """This seed's clean records (placed as the black-box audit places them), canaries
    and runs, eps1 first (its sigma scales the controls')."""
    folder, _, _ = prepare(args.out / "work" / f"seed-{seed}", 0, args.clean_records, seed,
                           args.clients)
    federation = Federation.load(folder, args.clients, seed)
    eps1_sigma = max(federation.plan(args.rounds, None).noise_multiplier.values())
    shapes = {n: a.shape for n, a in global_arrays(
        CanaryTrainer(federation.recipe, seed).model,
        method_for(federation.recipe.method)).items()}
    canaries = draw_canaries(args.canaries, args.clients, shapes, seed + 7)
    rows = []
    for run in (r for r in RUNS if r in args.runs):
        done = args.out / "work" / f"seed-{seed}" / f"{run.replace('/', '-')}.json"
        if not done.exists():  # a rerun resumes: finished runs are read back
            row = audit_run(federation, run, eps1_sigma, canaries, args, seed)
            done.write_text(json.dumps(row, indent=2) + "\n")
            log.info("%s", row)
        rows.append(json.loads(done.read_text()))
    return rows


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    delta = max(r["delta"] for r in results)
    lines = [f"White-box one-run audit (Dirac gradient canaries scored on each site's "
             f"uploads), all-MiniLM-L6-v2 FFA-LoRA, AG News: {args.clean_records} clean "
             f"records over {args.clients} sites, {args.canaries} canaries each in with "
             f"probability 1/2; {args.rounds} rounds x {TRAINING['local-steps']} steps "
             f"x batch {TRAINING['batch-size']}, SGD {TRAINING['learning-rate']:g}, "
             f"clipping {TRAINING['privacy.max-grad-norm']}; bound at {CONFIDENCE:.0%} "
             f"(Bonferroni over k in "
             f"{list(GUESSES)}); the highest bound {args.canaries} canaries can give is "
             f"{highest_bound(args.canaries, delta):.2f}.", "",
             "| run | seed | σ | ledger ε | δ | test accuracy | score in / out | best k "
             "| correct / guesses | ε lower bound | p (ε = 0) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['run']} | {r['seed']} | {r['sigma']:.3g} | "
                     f"{r['epsilon_ledger']:.3g} | {r['delta']:.0e} | "
                     f"{r['test_accuracy']:.3f} | {r['score_in']:.2e} / "
                     f"{r['score_out']:.2e} | {r['k']} | {r['v']} / {r['r']} | "
                     f"{r['epsilon_lower_bound']:.3f} | {r['p_no_leak']:.2g} |")
    return "\n".join(lines + ["", *run_summaries(results)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--clean-records", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", type=Path,
                        default=Path("experiments/results/audit_gradient_canaries"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = [row for seed in args.seeds for row in audit_seed(args, seed)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results, args))
    log.info("\n%s", markdown(results, args))


if __name__ == "__main__":
    main()
