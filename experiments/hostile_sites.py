"""One registered site of five lies in every round: what the run does, and the accuracy
it ends at, under each aggregation rule, against the same federation without the liar.

The attacks, applied to the hostile site's honest reply (sent: the global tensors it
received; its honest update is reply - sent):
- scaled: sent + 1000 x update;  garbage: N(0, 10^2) tensors;
- inflated: the honest tensors, num-examples = 1e9;
- sign-flipped: sent - update;  replayed: its reply of round 1, sent again every round;
- at-the-bound: sent + update scaled to 99% of the site's DP-aware bound (the largest
  lie the screening lets through).

The evaluation attacks, applied to its honest evaluation reply (EVALUATION_ATTACKS): a
perfect score at 1e7 times its test set (outside the census), and at its own size (a
wrong but consistent score, which screening cannot tell). Each runs under the
evaluation rules "median" and "trimmed-mean", each run keeping the pooled figure beside
its own; the row is the final accuracy's shift from the same rule without the liar.

Runs the real ServerApp and ClientApp in process (experiments.local_grid), sample-level
DP at epsilon 8, the demo task, all-MiniLM-L6-v2 FFA. Writes `hostile_sites.md` and the
run folders' metrics under --out.

    python -m experiments.hostile_sites --out experiments/results/hostile_sites
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import MetricRecord

from experiments.flwr_job import app_defaults
from experiments.local_grid import LocalGrid, run_federation
from experiments.tuning import interval, t_half_width
from fed_dplora.config import RunSpec, parse_run_config
from fed_dplora.dp.update_bound import LocalUpdate, update_norm_bound
from fed_dplora.run.results import read_metrics
from strategies import wire as p
from strategies.wire import to_arrays, to_record

log = logging.getLogger("fed_dplora.hostile_sites")
NODES, HOSTILE = 5, 104  # node 104 is partition-4
RULES = ("mean", "trimmed-mean", "median")
# Evaluation-rule runs, each keeping the pooled figure beside its own: "pooled" is read
# from both, and must agree (the training, and so the pooled figure, is the same).
EVALUATION_RULES = ("median", "trimmed-mean")
REPORTED = ("pooled", *EVALUATION_RULES)
Arrays = dict[str, np.ndarray]
# (sent, honest arrays, the hostile site's earlier honest replies, reply, its bound)
Attack = Callable[[Arrays, Arrays, list, object, float | None], Arrays | None]


def moved(sent: Arrays, honest: Arrays, factor: float) -> Arrays:
    return {k: (sent[k] + factor * (honest[k] - sent[k])).astype(np.float32) for k in honest}


def norm(sent: Arrays, arrays: Arrays) -> float:
    return math.sqrt(sum(float(np.sum((arrays[k] - sent[k]) ** 2)) for k in arrays))


ATTACKS: dict[str, Attack] = {
    "scaled": lambda sent, honest, earlier, reply, bound: moved(sent, honest, 1000.0),
    "garbage": lambda sent, honest, earlier, reply, bound: {
        k: np.random.default_rng(0).normal(0, 10, v.shape).astype(np.float32)
        for k, v in honest.items()},
    "inflated": lambda sent, honest, earlier, reply, bound: (
        reply.content[p.METRICS].__setitem__(p.NUM_EXAMPLES, 1e9)),
    "sign-flipped": lambda sent, honest, earlier, reply, bound: moved(sent, honest, -1.0),
    "replayed": lambda sent, honest, earlier, reply, bound: earlier[0] if earlier else None,
    "at-the-bound": lambda sent, honest, earlier, reply, bound: moved(
        sent, honest, 0.99 * bound / norm(sent, honest)),
}


def perfect_score(metrics, scale: int) -> None:
    """A self-consistent evaluation reply: every test record correct, each class's
    records `scale` times its own."""
    true = [float(scale * c) for c in metrics[p.EVAL_CLASS_TRUE]]
    metrics.update({p.NUM_EXAMPLES: sum(true), p.EVAL_WEIGHT: sum(true),
                    p.EVAL_ACCURACY: 1.0, p.EVAL_LOSS: 0.0, p.EVAL_CLASS_TRUE: true,
                    p.EVAL_CLASS_PREDICTED: true, p.EVAL_CLASS_CORRECT: true})


# What a hostile site does to its evaluation reply's metrics (in place).
EVALUATION_ATTACKS: dict[str, Callable[[dict], None]] = {
    "perfect-at-1e7-times-its-size": lambda m: perfect_score(m, 10**7),
    "perfect-at-its-size": lambda m: perfect_score(m, 1),
}


def make_evaluation_hostile(grid: LocalGrid, node: int, attack: Callable[[dict], None]
                            ) -> None:
    """Node `node` of `grid` answers every evaluate message with `attack` applied to its
    honest reply's metrics."""
    def tamper(kind, reply):
        if kind == "evaluate" and not reply.has_error():
            metrics = dict(reply.content[p.METRICS])
            attack(metrics)
            reply.content[p.METRICS] = MetricRecord(metrics)
        return reply
    grid.tamper[node] = tamper


def make_hostile(grid: LocalGrid, node: int, attack: Attack) -> None:
    """Node `node` of `grid` answers every train message with `attack` applied to its
    honest reply (None from the attack: tensors unchanged). It knows the plan, as any
    site does, so it knows its own DP-aware bound."""
    sent, earlier = {}, []
    send_and_receive = grid.send_and_receive
    spec = parse_run_config(grid.contexts[node].run_config)

    def capture(messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            if m.metadata.dst_node_id == node and p.ARRAYS in m.content.array_records:
                sent["arrays"] = to_arrays(m.content[p.ARRAYS])
                sent["sigma"] = m.content[p.CONFIG].get(p.NOISE_MULTIPLIER)
        return send_and_receive(messages, timeout=timeout)

    def tamper(kind, reply):
        if kind != "train" or reply.has_error() or p.ARRAYS not in reply.content.array_records:
            return reply
        honest = to_arrays(reply.content[p.ARRAYS])
        bound = _own_bound(spec, sent, int(reply.content[p.METRICS][p.NUM_EXAMPLES]))
        arrays = attack(sent["arrays"], honest, earlier, reply, bound)
        earlier.append(honest)
        if arrays is not None:
            reply.content[p.ARRAYS] = to_record(arrays)
        return reply
    grid.send_and_receive = capture
    grid.tamper[node] = tamper


def run_config(out: Path, name: str, seed: int, rule: str, model: str) -> dict:
    return {**app_defaults(), "model.name": model, "output-dir": str(out), "run-name": name,
            "seed": seed, "clients-per-round": NODES, "num-server-rounds": 5,
            "min-replies": NODES - 1, "local-steps": 4, "batch-size": 64,
            "physical-batch-size": 64, "data.demo-records-per-site": 400,
            "aggregation.rule": rule, "privacy.secure-noise": False}


def one_run(out: Path, attack: str, seed: int, rule: str, model: str) -> dict:
    """Final accuracy, and what the hostile site's replies became."""
    config = run_config(out, f"{attack}-{rule}-seed{seed}", seed, rule, model)
    rows = finished_rows(out, config, None if attack == "none" else
                         lambda grid: make_hostile(grid, HOSTILE, ATTACKS[attack]))
    rejected = sum("partition-4" in r["failures"]["train"] for r in rows)
    reasons = {r["failures"]["train"].get("partition-4", "")[:40] for r in rows} - {""}
    return {"accuracy": rows[-1]["eval_accuracy"], "rejected_rounds": rejected,
            "reasons": sorted(reasons)}


def evaluation_run(out: Path, attack: str, seed: int, rule: str, model: str) -> dict:
    """The final figure by `rule` and the pooled one, and what the hostile site's
    evaluation replies became."""
    config = {**run_config(out, f"evaluation-{attack}-{rule}-seed{seed}", seed, "mean",
                           model), "evaluation.rule": rule}
    rows = finished_rows(out, config, None if attack == "none" else
                         lambda grid: make_evaluation_hostile(grid, HOSTILE,
                                                              EVALUATION_ATTACKS[attack]))
    rejected = sum("partition-4" in r["failures"]["evaluate"] for r in rows)
    reasons = {r["failures"]["evaluate"].get("partition-4", "")[:40] for r in rows} - {""}
    return {"accuracy": rows[-1]["eval_accuracy"], "pooled": rows[-1]["pooled_eval_accuracy"],
            "rejected_rounds": rejected, "reasons": sorted(reasons)}


def finished_rows(out: Path, config: dict, hostile: Callable[[LocalGrid], None] | None
                  ) -> list[dict]:
    """The run's metrics rows. A finished run is read, not run again; an interrupted one
    continues from its checkpoint."""
    folder = out / config["run-name"]
    if not (folder / "summary.json").exists():
        config["resume"] = (folder / "config.json").exists()
        grid = LocalGrid(config, NODES)
        if hostile is not None:
            hostile(grid)
        run_federation(config, NODES, grid)
    return read_metrics(folder)


def _own_bound(spec: RunSpec, sent: dict, records: int) -> float | None:
    """The bound the server checks this site's update against (sample level only)."""
    if sent.get("sigma") is None:
        return None
    train = spec.train
    return update_norm_bound(LocalUpdate(
        records, train.batch_size, train.local_steps, spec.privacy.max_grad_norm,
        sent["sigma"], train.learning_rate, train.optimizer,
        sum(a.size for a in sent["arrays"].values())))


def table(results: dict) -> str:
    """Final accuracy per attack and rule (mean ± 95% t-interval over seeds), and what
    the run did with the hostile site's replies over all its runs."""
    lines = ["| hostile site | its replies, over all runs | seeds | "
             + " | ".join(RULES) + " |", "|---|---|---|" + "---|" * len(RULES)]
    for attack, by_rule in results.items():
        runs = [r for rule in RULES for r in by_rule[rule]]
        if runs:
            cells = [interval([r["accuracy"] for r in by_rule[rule]]) if by_rule[rule]
                     else "not run" for rule in RULES]
            seeds = min(len(by_rule[rule]) for rule in RULES)
            lines.append(f"| {attack} | {_what_it_did(attack, runs)} | {seeds} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def _what_it_did(attack: str, runs: list[dict], what: str = "rounds") -> str:
    if attack == "none":
        return "(no hostile site)"
    rounds, rejected = 5 * len(runs), sum(r["rejected_rounds"] for r in runs)
    if not rejected:
        return f"accepted in all {rounds} {what}"
    reasons = sorted({reason.split(",")[0] for r in runs for reason in r["reasons"]})
    return f"rejected in {rejected} of {rounds} {what} ({reasons[0]}, ...)"


def differences(results: dict) -> str:
    """Paired by seed: each attack's accuracy minus the same rule's without a hostile
    site, and median or trimmed mean minus mean under the same attack (95% t-intervals;
    "not shown" where the interval includes zero)."""
    lines = ["| hostile site | " + " | ".join(f"{rule} - no hostile site" for rule in RULES)
             + " | median - mean | trimmed-mean - mean |", "|---|" + "---|" * 5]
    for attack, by_rule in results.items():
        if attack == "none" or not all(by_rule[rule] for rule in RULES):
            continue
        cells = [_paired(by_rule[rule], results["none"][rule]) for rule in RULES]
        cells += [_paired(by_rule[rule], by_rule["mean"]) for rule in RULES[:0:-1]]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluation_table(results: dict) -> str:
    """Per evaluation attack: what the run did with the liar's evaluation replies, and
    the final accuracy's shift from the same rule without it, paired by seed."""
    lines = ["| hostile site's evaluation | its replies, over all runs | seeds | "
             + " | ".join(f"{rule}: shift" for rule in REPORTED) + " |",
             "|---|---|---|" + "---|" * len(REPORTED)]
    for attack, by_rule in results.items():
        if attack == "none" or not all(by_rule[r] for r in EVALUATION_RULES):
            continue
        runs = [r for rule in EVALUATION_RULES for r in by_rule[rule]]
        seeds = min(len(by_rule[rule]) for rule in EVALUATION_RULES)
        cells = [_paired(by_rule[EVALUATION_RULES[0]], results["none"][EVALUATION_RULES[0]],
                         "pooled")]
        cells += [_paired(by_rule[rule], results["none"][rule]) for rule in EVALUATION_RULES]
        lines.append(f"| {attack} | {_what_it_did(attack, runs, 'evaluations')} | {seeds} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired(runs: list[dict], baseline: list[dict], key: str = "accuracy") -> str:
    pairs = list(zip([r[key] for r in runs], [b[key] for b in baseline]))
    gaps = [a - b for a, b in pairs]
    if len(gaps) < 2:
        return f"{gaps[0]:+.3f} (1 seed)" if gaps else "not run"
    half = t_half_width(gaps)
    mean = statistics.fmean(gaps)
    shown = "" if abs(mean) > half else ", not shown"
    return f"{mean:+.3f} ± {half:.3f}{shown}"


def check_pooled_agrees(results: dict) -> None:
    """The pooled figure of a seed's median and trimmed-mean runs is the same number:
    the rule changes the report, never the training."""
    for attack, by_rule in results.items():
        for one, other in zip(*(by_rule[rule] for rule in EVALUATION_RULES)):
            if not math.isclose(one["pooled"], other["pooled"], abs_tol=1e-9):
                raise SystemExit(f"{attack}: pooled {one['pooled']} and {other['pooled']} "
                                 "differ between evaluation rules at a seed")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.hostile_sites")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--attacks", nargs="*", default=["none", *ATTACKS])
    parser.add_argument("--evaluation-attacks", nargs="*",
                        default=["none", *EVALUATION_ATTACKS])
    parser.add_argument("--tables-only", action="store_true",
                        help="rewrite hostile_sites.md from the results files, run nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # runs of other invocations into --out are kept
    training, evaluation = args.out / "results.json", args.out / "evaluation_results.json"
    if not args.tables_only:
        run_cells(training, args.attacks, RULES, lambda attack, seed, rule: one_run(
            args.out, attack, seed, rule, args.model), args.seeds)
        run_cells(evaluation, args.evaluation_attacks, EVALUATION_RULES,
                  lambda attack, seed, rule: evaluation_run(args.out, attack, seed, rule,
                                                            args.model), args.seeds)
    write_tables(args.out, *(json.loads(f.read_text()) if f.exists() else {}
                             for f in (training, evaluation)))


def run_cells(saved: Path, attacks: list[str], rules: tuple[str, ...],
              run: Callable[[str, int, str], dict], seeds: int) -> None:
    """Every attack under every rule at a seed before the next seed, each cell saved to
    `saved` as it finishes."""
    results = json.loads(saved.read_text()) if saved.exists() else {}
    for attack in attacks:
        results[attack] = {r: [] for r in rules}
    for seed in range(seeds):
        for attack in attacks:
            for rule in rules:
                results[attack][rule].append(run(attack, seed, rule))
                saved.write_text(json.dumps(results, indent=1))


def write_tables(out: Path, training: dict, evaluation: dict) -> None:
    text = table(training) + "\n\n" + differences(training) + "\n"
    if evaluation.get("none"):
        check_pooled_agrees(evaluation)
        text += "\n" + evaluation_table(evaluation) + "\n"
    (out / "hostile_sites.md").write_text(text)
    log.info("%s", text)


if __name__ == "__main__":
    main()
