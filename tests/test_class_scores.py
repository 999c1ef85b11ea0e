"""Macro-F1 and per-class recall: from per-class counts summed over sites, checked
against a direct computation on the pooled records; reported by a real run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from fed_dplora.class_scores import ClassCounts, summed
from fed_dplora.data.demo import LABELS, generate_site
from fed_dplora.data.sources import LabelledText
from fed_dplora.data.tokenize import tokenize
from fed_dplora.lora.model import build_lora_model, load_tokenizer
from fed_dplora.run.results import read_metrics
from fed_dplora.tasks import task_for
from fed_dplora.site.trainer import evaluate_model
from experiments.local_grid import run_federation
from strategies.evaluation_pooling import pooled_evaluation
from test_model_factory import CPU, recipe


def counts_of(truth: list[int], predicted: list[int], classes: int) -> ClassCounts:
    return ClassCounts(tuple(truth.count(k) for k in range(classes)),
                       tuple(predicted.count(k) for k in range(classes)),
                       tuple(sum(t == p == k for t, p in zip(truth, predicted))
                             for k in range(classes)))


def direct_macro_f1(truth: list[int], predicted: list[int]) -> float:
    """Per class: precision and recall from the records, F1 = 2PR / (P + R)."""
    scores = []
    for k in sorted(set(truth) | set(predicted)):
        hits = sum(t == p == k for t, p in zip(truth, predicted))
        precision = hits / predicted.count(k) if predicted.count(k) else 0.0
        recall = hits / truth.count(k) if truth.count(k) else 0.0
        scores.append(2 * precision * recall / (precision + recall) if hits else 0.0)
    return sum(scores) / len(scores)


def test_pooled_counts_give_the_pooled_macro_f1_not_a_mean_of_site_scores():
    rng = random.Random(0)
    sites = []
    for size, skew in ((300, 0), (120, 2), (40, 3)):  # sizes and label mixes differ
        truth = [rng.choice([skew, skew, 0, 1, 2, 3]) for _ in range(size)]
        predicted = [t if rng.random() < 0.6 else rng.randrange(4) for t in truth]
        sites.append((truth, predicted))
    pooled = summed([counts_of(t, p, 4) for t, p in sites])
    all_truth = [t for truth, _ in sites for t in truth]
    all_predicted = [p for _, predicted in sites for p in predicted]
    assert pooled.macro_f1() == pytest.approx(direct_macro_f1(all_truth, all_predicted))
    site_mean = sum(direct_macro_f1(t, p) for t, p in sites) / len(sites)
    assert abs(pooled.macro_f1() - site_mean) > 0.01
    for k, recall in enumerate(pooled.recalls()):
        hits = sum(t == p == k for t, p in zip(all_truth, all_predicted))
        assert recall == pytest.approx(hits / all_truth.count(k))
    rows = [{"eval-weight": len(t), "num-examples": len(t), "eval-loss": 1.0,
             "eval-accuracy": sum(a == b for a, b in zip(t, p)) / len(t),
             "eval-class-true": list(c.true), "eval-class-predicted": list(c.predicted),
             "eval-class-correct": list(c.correct)}
            for t, p in sites for c in [counts_of(t, p, 4)]]
    assert pooled_evaluation(rows)["eval-macro-f1"] == pytest.approx(pooled.macro_f1())
    assert pooled_evaluation(rows)["eval-accuracy"] == pytest.approx(
        sum(a == b for a, b in zip(all_truth, all_predicted)) / len(all_truth))


def test_a_class_never_seen_or_predicted_is_left_out_and_has_no_recall():
    counts = counts_of([0, 0, 1], [0, 1, 1], 3)
    assert counts.recalls() == (0.5, 1.0, None)
    assert counts.macro_f1() == pytest.approx(direct_macro_f1([0, 0, 1], [0, 1, 1]))


def test_evaluation_counts_every_test_record_once(tiny_bert):
    texts, labels = generate_site(1, 90, 0)
    data = tokenize(LabelledText(tuple(texts), tuple(labels)),
                    load_tokenizer(recipe(tiny_bert, "ffa").model), 32, LABELS)
    model = build_lora_model(recipe(tiny_bert, "ffa"), CPU)
    report = evaluate_model(model, task_for("sequence-classification"), data, 16, CPU)
    with torch.no_grad():
        predicted = model(*data.batch(list(range(len(data))), CPU)[:2]).argmax(-1).tolist()
    assert report.classes == counts_of(data.labels.tolist(), predicted, len(LABELS))
    assert sum(report.classes.correct) / len(data) == pytest.approx(report.accuracy)


def test_a_run_reports_macro_f1_recall_and_validation_metrics(config):
    config = {**config, "data.validation-fraction": 0.25, "num-server-rounds": 1}
    run_federation(config, 2)
    run_dir = Path(config["output-dir"]) / "run"
    (row,) = read_metrics(run_dir)
    assert set(row["eval_recall"]) == set(LABELS)
    assert 0 <= row["eval_macro_f1"] <= 1 and 0 <= row["val_macro_f1"] <= 1
    assert row["val_accuracy"] is not None and row["val_loss"] > 0
    plan = json.loads((run_dir / "privacy_plan.json").read_text())
    # 150 demo records a site: 120 train, of which 25% (30) are held out for validation.
    assert plan["client_sizes"] == {"partition-0": 90, "partition-1": 90}
