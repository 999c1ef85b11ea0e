"""A registered site that lies: its replies are screened against the census and the
DP-aware update bound, and robust rules bound what a lie inside the bound buys."""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers import NodesOnly

from experiments.hostile_sites import (ATTACKS, EVALUATION_ATTACKS, HOSTILE, NODES,
                                      make_evaluation_hostile, make_hostile)
from experiments.local_grid import LocalGrid, run_federation
from experiments.update_bound_check import (
    CASES,
    adam_step_ratio,
    adversarial_adam_gradients,
    exceedance_check,
)
from fed_dplora.aggregation import capped_weights
from fed_dplora.class_scores import ClassCounts
from fed_dplora.config import AggregationSpec, ConfigError, EvaluationSpec, parse_run_config
from fed_dplora.dp.update_bound import LocalUpdate, update_norm_bound
from fed_dplora.run.results import read_base_score, read_metrics
from strategies import wire as p
from strategies.evaluation_pooling import MACRO_F1, POOLED, RECALL
from strategies.lora_fedavg import LoraFedAvg
from strategies.screening import Accepted, Screened, ScreenedMetrics
from strategies.wire import to_record


def grid_folder(config) -> Path:
    return Path(config["output-dir"]) / config["run-name"]


@pytest.fixture()
def five_sites(config) -> dict:
    return {**config, "clients-per-round": NODES, "num-server-rounds": 2,
            "min-replies": NODES - 1}


@pytest.mark.parametrize("attack, reason", [
    ("scaled", "exceeds"), ("garbage", "exceeds"), ("inflated", "census size")])
def test_a_lie_outside_what_an_honest_site_can_send_is_a_failure(five_sites, attack, reason):
    grid = LocalGrid(five_sites, NODES)
    make_hostile(grid, HOSTILE, ATTACKS[attack])
    run_federation(five_sites, NODES, grid)
    rows = read_metrics(grid_folder(five_sites))
    for row in rows:
        assert row["replies"] == NODES - 1 and not row["lost"]
        assert reason in row["failures"]["train"]["partition-4"]


@pytest.mark.parametrize("attack", ["sign-flipped", "replayed", "at-the-bound"])
def test_a_lie_inside_the_bound_is_accepted(five_sites, attack):
    """Screening cannot tell these from honest replies: the robust rules bound them
    (their effect on accuracy: experiments/hostile_sites.py, docs/deployment.md)."""
    grid = LocalGrid(five_sites, NODES)
    make_hostile(grid, HOSTILE, ATTACKS[attack])
    run_federation(five_sites, NODES, grid)
    rows = read_metrics(grid_folder(five_sites))
    assert all(r["replies"] == NODES and not r["failures"]["train"] for r in rows)


def test_honest_updates_stay_within_the_bound_at_its_stated_probability():
    """10,000 simulated honest updates per plan (aligned signal, the bound's worst case):
    the bound at p = 1e-2 is passed in at most a fraction p of them (99.9% interval)."""
    for name, update in CASES.items():
        result = exceedance_check(update, 1e-2, 10_000)
        assert result["exceeded"] <= result["allowed"], name
        assert result["p99"] < result["bound"] < 3 * result["median"], name  # and not vacuous
    assert adam_step_ratio(adversarial_adam_gradients(10, np.random.default_rng(1)),
                           0.01) <= 1.0


def test_a_real_dp_sgd_update_comes_close_to_its_bound_but_not_past_it(tiny_bert):
    """With noise dominating (sigma = 50), the bound is nearly tight: an error in d, the
    momentum weights or the batch divisor would show as a real update past it."""
    from clients.local_site import prepare, round_plan
    from fed_dplora.data.site import SitePlacement, load_site
    from fed_dplora.lora.adapters import trainable_arrays
    spec = parse_run_config({"model.name": tiny_bert, "local-steps": 4, "batch-size": 32,
                             "physical-batch-size": 16, "learning-rate": 0.5,
                             "data.demo-records-per-site": 150})
    splits = load_site(spec, SitePlacement(0, 1))
    trainer, (train, _, _) = prepare(spec, SitePlacement(0, 1), splits,
                                     ("emergency", "routine", "urgent"))
    sent = {k: v.copy() for k, v in trainable_arrays(trainer.model).items()}
    bound = update_norm_bound(LocalUpdate(len(splits.train), 32, 4, 1.0, 50.0, 0.5, "sgd",
                                          sum(v.size for v in sent.values())))
    ratios = []
    for seed in range(3):
        plan = round_plan(spec, {p.NOISE_MULTIPLIER: 50.0, p.ROUND_SEED: seed}, False)
        arrays, _ = trainer.train(sent, plan, train)
        ratios.append(math.sqrt(sum(float(np.sum((arrays[k] - sent[k]) ** 2))
                                    for k in arrays)) / bound)
    assert 0.8 < max(ratios) <= 1.0, ratios


def test_robust_rules_are_flowers_coordinate_wise_statistics():
    updates = [{"b": np.array([[v, -v]], np.float32)} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    weights = [1.0] * 5
    median = LoraFedAvg(aggregation=AggregationSpec(rule="median")).combine(updates, weights)
    trimmed = LoraFedAvg(aggregation=AggregationSpec(rule="trimmed-mean", trim_fraction=0.2)
                         ).combine(updates, weights)
    mean = LoraFedAvg().combine(updates, weights)
    assert median["b"].tolist() == [[3.0, -3.0]]
    assert trimmed["b"].tolist() == [[3.0, -3.0]]  # 1 cut from each side: mean of 2, 3, 4
    assert mean["b"].tolist() == [[22.0, -22.0]]


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_one_hostile_site_of_five_cannot_push_a_robust_rule_outside_the_honest_range(rule):
    """Whatever the fifth site sends, each coordinate of the median (and of the mean
    trimmed by one each side) lies between the honest sites' values; the mean's does
    not."""
    rng = np.random.default_rng(0)
    honest = [{"b": rng.normal(size=(4, 8)).astype(np.float32)} for _ in range(4)]
    low = np.min([u["b"] for u in honest], axis=0)
    high = np.max([u["b"] for u in honest], axis=0)
    strategy = LoraFedAvg(aggregation=AggregationSpec(rule=rule, trim_fraction=0.2))
    for lie in (1e3, -1e3, 0.0, 3.0):
        updates = [*honest, {"b": np.full((4, 8), lie, np.float32)}]
        combined = strategy.combine(updates, [1.0] * 5)["b"]
        assert np.all(low <= combined) and np.all(combined <= high), lie
    pushed = LoraFedAvg().combine([*honest, {"b": np.full((4, 8), 1e3, np.float32)}],
                                  [1.0] * 5)["b"]
    assert np.all(pushed > high)


def test_a_weight_cap_and_uniform_weights_bound_a_census_lie():
    assert capped_weights([1e9, 100, 100, 100, 100], 0.3) == pytest.approx(
        [0.3, 0.175, 0.175, 0.175, 0.175])
    assert capped_weights([5, 3, 2], 1.0) == [5, 3, 2]
    strategy = LoraFedAvg(sizes={1: 10**9, 2: 100},
                          aggregation=AggregationSpec(weights="uniform"))
    screened = Screened([1, 2], {n: Accepted({"b": np.zeros(1)}, {}) for n in (1, 2)}, {})
    assert strategy.updates(screened)[1] == [1.0, 1.0]


def test_client_level_dp_accepts_only_the_mean():
    with pytest.raises(ConfigError, match="client-level DP's sensitivity"):
        parse_run_config({"privacy.level": "both", "aggregation.rule": "median"})
    parse_run_config({"privacy.level": "sample", "aggregation.rule": "median"})


def test_the_study_tables_pair_by_seed_and_say_not_shown_where_zero_is_inside():
    from experiments.hostile_sites import RULES, differences, table

    def runs(accuracies, rejected=0):
        return [{"accuracy": a, "rejected_rounds": rejected,
                 "reasons": ["update norm 9e+03 exceeds 33, the bound"] if rejected else []}
                for a in accuracies]
    results = {"none": {rule: runs([0.80, 0.70, 0.75]) for rule in RULES},
               "sign-flipped": {"mean": runs([0.60, 0.50, 0.55]),
                                "trimmed-mean": runs([0.82, 0.68, 0.77]),
                                "median": runs([0.70, 0.60, 0.65])},
               "scaled": {rule: runs([0.8, 0.7, 0.75], rejected=5) for rule in RULES}}
    rows = {line.split(" | ")[0][2:]: line for line in differences(results).splitlines()}
    # mean - none: -0.2 at every seed; trimmed-mean - none: +0.02, -0.02, +0.02
    assert "| -0.200 ± 0.000 |" in rows["sign-flipped"]
    assert "+0.007 ± 0.057, not shown" in rows["sign-flipped"]  # t(0.975, 2) = 4.303
    assert "rejected in 45 of 45 rounds (update norm 9e+03 exceeds 33" in table(results)
    assert "| 3 | 0.7500 ± 0.1242 |" in table(results)



def _evaluation_runs(accuracies, pooled, rejected=0):
    return [{"accuracy": a, "pooled": q, "rejected_rounds": rejected,
             "reasons": ["reports num-examples=8e+08, not its census size 80"] * bool(rejected)}
            for a, q in zip(accuracies, pooled)]


def test_the_evaluation_table_pairs_each_rule_with_its_own_run_without_the_liar():
    from experiments.hostile_sites import evaluation_table
    results = {"none": {"median": _evaluation_runs([0.70, 0.80, 0.75], [0.72, 0.82, 0.70]),
                        "trimmed-mean": _evaluation_runs([0.71, 0.79, 0.76],
                                                         [0.72, 0.82, 0.70])},
               "perfect": {"median": _evaluation_runs([0.72, 0.82, 0.77], [0.77, 0.87, 0.75]),
                           "trimmed-mean": _evaluation_runs([0.71, 0.80, 0.74],
                                                            [0.77, 0.87, 0.75], rejected=5)}}
    (row,) = [line for line in evaluation_table(results).splitlines()
              if line.startswith("| perfect |")]
    cells = row.split(" | ")
    assert cells[1].startswith("rejected in 15 of 30 evaluations (reports num-examples")
    assert cells[3] == "+0.050 ± 0.000"  # pooled: +0.05 at every seed
    assert cells[4] == "+0.020 ± 0.000"  # median against median
    half = scipy.stats.t.ppf(0.975, 2) * statistics.stdev([0.0, 0.01, -0.02]) / 3 ** 0.5
    assert cells[5] == f"-0.003 ± {half:.3f}, not shown |"  # trimmed mean against its own


def test_a_study_whose_rules_disagree_on_the_pooled_figure_stops():
    from experiments.hostile_sites import check_pooled_agrees
    agreeing = {"none": {rule: _evaluation_runs([0.7], [0.72])
                         for rule in ("median", "trimmed-mean")}}
    check_pooled_agrees(agreeing)
    agreeing["none"]["trimmed-mean"][0]["pooled"] = 0.73
    with pytest.raises(SystemExit, match="differ between evaluation rules"):
        check_pooled_agrees(agreeing)


def test_the_guide_shows_the_committed_evaluation_rows():
    """docs/deployment.md 4b and the study's own table are what the committed
    evaluation runs give (experiments/results/hostile_sites/evaluation_results.json)."""
    from experiments.hostile_sites import evaluation_table
    root = Path(__file__).resolve().parents[1]
    study = root / "experiments" / "results" / "hostile_sites"
    rows = evaluation_table(json.loads((study / "evaluation_results.json").read_text()))
    assert rows.count("\n| perfect") == 2
    for document in (root / "docs" / "deployment.md", study / "hostile_sites.md"):
        assert rows in document.read_text(), document


# Evaluation replies: bounded by the census's split sizes and by their own numbers.
HONEST = {p.NUM_EXAMPLES: 20, p.EVAL_WEIGHT: 20, p.EVAL_LOSS: 0.6, p.EVAL_ACCURACY: 0.75,
          p.EVAL_CLASS_TRUE: [8, 7, 5], p.EVAL_CLASS_PREDICTED: [9, 6, 5],
          p.EVAL_CLASS_CORRECT: [6, 5, 4]}
CAUSAL_LM = {p.NUM_EXAMPLES: 20, p.EVAL_WEIGHT: 400, p.EVAL_LOSS: 2.5,
             p.EVAL_ACCURACY: 0.3}


def evaluation_round(monkeypatch, replies: dict[int, dict], eval_sizes: dict | None,
                     **strategy_kwargs) -> ScreenedMetrics:
    """One evaluation round of a LoraFedAvg over the nodes of `replies`, each answering
    its metrics (outside a Flower run: a task identity for the replies)."""
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    strategy = LoraFedAvg(min_available_nodes=0, eval_sizes=eval_sizes,
                          evaluation_sampler=lambda rnd, nodes: nodes, **strategy_kwargs)
    messages = strategy.configure_evaluate(1, to_record({"b": np.zeros(2, np.float32)}),
                                           ConfigRecord({}), NodesOnly(sorted(replies)))
    answers = []
    for message in messages:
        node = message.metadata.dst_node_id
        message.metadata.__dict__["_message_id"] = f"e-n{node}"
        monkeypatch.setattr(TaskIdentity, "_node_id", node)  # the reply's source
        answers.append(Message(RecordDict({p.METRICS: MetricRecord(replies[node])}),
                               reply_to=message))
    return strategy.aggregate_evaluate(1, answers)


LIES = {
    "inflated-weight": ({**HONEST, p.NUM_EXAMPLES: 10**9, p.EVAL_WEIGHT: 10**9},
                        "census size"),
    "accuracy-1-at-weight-1e9": ({**HONEST, p.NUM_EXAMPLES: 10**9, p.EVAL_WEIGHT: 10**9,
                                    p.EVAL_ACCURACY: 1.0}, "census size"),
    "accuracy-above-1": ({**HONEST, p.EVAL_ACCURACY: 1.5}, "outside [0, 1]"),
    "counts-not-summing-to-records": (
        {**HONEST, p.EVAL_CLASS_TRUE: [8, 7, 9]}, "sums to 24"),
    "counts-crafted-to-raise-macro-f1": (
        {**HONEST, p.EVAL_CLASS_CORRECT: [8, 7, 5]}, "exceeds a class's"),
    "accuracy-not-its-hits": ({**HONEST, p.EVAL_ACCURACY: 0.95}, "is not its hits"),
    "weight-not-its-records": ({**HONEST, p.EVAL_WEIGHT: 10},
                               "differs from its records"),
    "causal-lm-perplexity-below-1": ({**CAUSAL_LM, p.EVAL_LOSS: -0.5}, "negative"),
    "causal-lm-more-tokens-than-its-records-hold": (
        {**CAUSAL_LM, p.EVAL_WEIGHT: 10**9}, "can count"),
    "a-split-the-census-did-not-report": (
        {**HONEST, **{p.VALIDATION + k: v for k, v in HONEST.items()}}, "census did not"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_an_evaluation_reply_inconsistent_with_its_census_or_itself_is_a_failure(
        monkeypatch, lie):
    metrics, reason = LIES[lie]
    causal = lie.startswith("causal-lm")
    honest = CAUSAL_LM if causal else HONEST
    pooled = evaluation_round(monkeypatch, {1: honest, 2: honest, 3: metrics},
                              {n: {"": 20} for n in (1, 2, 3)},
                              max_eval_weight_per_record=47 if causal else 1)
    assert reason in pooled.screened.failed[3], pooled.screened.failed
    assert pooled["replies"] == 2
    assert pooled[p.EVAL_ACCURACY] == pytest.approx(honest[p.EVAL_ACCURACY])


def test_without_census_sizes_a_reply_is_still_checked_against_itself(monkeypatch):
    """A ServerApp of the user's own, without the census: each reply's own consistency."""
    pooled = evaluation_round(monkeypatch, {1: HONEST, 2: {**HONEST, p.EVAL_ACCURACY: 1.5}},
                              None)
    assert "outside [0, 1]" in pooled.screened.failed[2]
    assert evaluation_round(monkeypatch, {1: HONEST, 2: HONEST}, None)["replies"] == 2


def test_a_site_scaling_its_evaluation_to_a_perfect_score_fails_at_the_census_size(
        five_sites):
    """End to end: the census shares each site's test size; a perfect score at 1e7 times
    it is a failure every round, and the reported accuracy is the honest sites'."""
    grid = LocalGrid(five_sites, NODES)
    make_evaluation_hostile(grid, HOSTILE, EVALUATION_ATTACKS["perfect-at-1e7-times-its-size"])
    run_federation(five_sites, NODES, grid)
    rows = read_metrics(grid_folder(five_sites))
    for row in rows:
        assert "census size" in row["failures"]["evaluate"]["partition-4"], row
        assert row["eval_accuracy"] < 0.99


def test_a_consistent_evaluation_lie_at_its_census_size_is_accepted(five_sites):
    """Screening cannot tell a wrong but consistent score for the site's own test set."""
    grid = LocalGrid(five_sites, NODES)
    make_evaluation_hostile(grid, HOSTILE, EVALUATION_ATTACKS["perfect-at-its-size"])
    run_federation(five_sites, NODES, grid)
    assert all(not row["failures"]["evaluate"] for row in read_metrics(grid_folder(five_sites)))


def consistent(correct: list[int], scale: int = 1) -> dict:
    """A self-consistent classification reply: 20 x `scale` test records, true counts
    [8, 7, 5] x scale predicted exactly as often, `correct` hits per class."""
    true = [scale * t for t in (8, 7, 5)]
    return {p.NUM_EXAMPLES: sum(true), p.EVAL_WEIGHT: sum(true),
            p.EVAL_LOSS: 1.0 - sum(correct) / sum(true), p.EVAL_ACCURACY: sum(correct)
            / sum(true), p.EVAL_CLASS_TRUE: true, p.EVAL_CLASS_PREDICTED: true,
            p.EVAL_CLASS_CORRECT: correct}


# Four honest sites of 20 test records, and one of 200 that claims a perfect score: a
# wrong but consistent lie at its census size, which screening cannot tell.
HONEST_SITES = {1: consistent([6, 5, 4]), 2: consistent([5, 5, 4]),
                3: consistent([6, 6, 4]), 4: consistent([4, 5, 4])}
PERFECT_LIAR = consistent([80, 70, 50], scale=10)
SITE_STATISTIC = {"median": statistics.median,
                  "trimmed-mean": lambda xs: float(scipy.stats.trim_mean(xs, 0.2))}


@pytest.mark.parametrize("rule", sorted(SITE_STATISTIC))
def test_a_robust_evaluation_rule_keeps_one_consistent_liar_inside_the_honest_range(
        monkeypatch, rule):
    """Pooled, the 200-record liar sets the figure (0.92, above every honest site's);
    the median or trimmed mean of the sites' own scores stays inside the honest range,
    and the pooled figure is kept beside it. Checked against statistics / scipy."""
    replies = {**HONEST_SITES, 5: PERFECT_LIAR}
    sizes = {n: {"": int(m[p.NUM_EXAMPLES])} for n, m in replies.items()}
    figure = evaluation_round(monkeypatch, replies, sizes,
                              evaluation=EvaluationSpec(rule=rule))
    honest = [m[p.EVAL_ACCURACY] for m in HONEST_SITES.values()]
    assert figure["replies"] == 5
    assert figure[POOLED + p.EVAL_ACCURACY] == pytest.approx((58 + 200) / 280)
    assert figure[POOLED + p.EVAL_ACCURACY] > max(honest)
    assert min(honest) <= figure[p.EVAL_ACCURACY] <= max(honest)
    statistic = SITE_STATISTIC[rule]
    counts = [ClassCounts(*(tuple(m[k]) for k in (p.EVAL_CLASS_TRUE, p.EVAL_CLASS_PREDICTED,
                                                    p.EVAL_CLASS_CORRECT)))
              for m in replies.values()]
    assert figure[p.EVAL_ACCURACY] == pytest.approx(statistic(
        [m[p.EVAL_ACCURACY] for m in replies.values()]))
    assert figure[p.EVAL_LOSS] == pytest.approx(statistic(
        [m[p.EVAL_LOSS] for m in replies.values()]))
    assert figure[MACRO_F1] == pytest.approx(statistic([c.macro_f1() for c in counts]))
    assert figure[RECALL] == pytest.approx([statistic(list(r)) for r in zip(
        *(c.recalls() for c in counts))])
    pooled = evaluation_round(monkeypatch, replies, sizes)
    assert pooled[p.EVAL_ACCURACY] == pytest.approx(figure[POOLED + p.EVAL_ACCURACY])
    assert POOLED + p.EVAL_ACCURACY not in pooled


def test_a_run_under_the_median_reports_it_and_keeps_the_pooled_figure(five_sites, caplog):
    """End to end: metrics.jsonl and the round line name the rule; against a site
    claiming a perfect score, the pooled figure it lifts stays beside the median."""
    config = {**five_sites, "evaluation.rule": "median"}
    grid = LocalGrid(config, NODES)
    make_evaluation_hostile(grid, HOSTILE, EVALUATION_ATTACKS["perfect-at-its-size"])
    with caplog.at_level(logging.INFO, logger="fed_dplora"):
        run_federation(config, NODES, grid)
    for row in read_metrics(grid_folder(config)):
        assert row["eval_rule"] == "median"
        assert row["pooled_eval_accuracy"] > row["eval_accuracy"], row
        assert row["pooled_eval_macro_f1"] is not None
    assert "by median (pooled: loss" in caplog.text


def test_the_server_bounds_a_causal_lm_evaluation_weight_by_max_length(tiny_llama_lm,
                                                                        config):
    """End to end, causal-lm: honest token counts pass; a site claiming more predicted
    tokens than its records can hold at model.max-length fails every round."""
    run_config = {**config, "task": "causal-lm", "model.name": tiny_llama_lm,
                  "num-server-rounds": 1, "clients-per-round": 3, "min-replies": 2,
                  "generation.max-new-tokens": 2, "generation.prompts": "the patient"}
    grid = LocalGrid(run_config, 3)
    tokens = run_config["model.max-length"]
    make_evaluation_hostile(grid, 102, lambda m: m.update(
        {p.EVAL_WEIGHT: m[p.NUM_EXAMPLES] * tokens}))
    run_federation(run_config, 3, grid)
    rows = [read_base_score(grid_folder(run_config)), *read_metrics(grid_folder(run_config))]
    for row in rows:
        assert list(row["failures"]["evaluate"]) == ["partition-2"], row
        assert "can count" in row["failures"]["evaluate"]["partition-2"]
        assert row["eval_sites"] == 2
