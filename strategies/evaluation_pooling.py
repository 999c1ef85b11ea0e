"""One evaluation split's figure over the sites' valid replies, by `evaluation.rule`.

"pooled" (the default): the metrics of the union of the sites' test sets, each site
weighted by what its means are over (records, or predicted tokens for causal-lm), class
scores from the summed per-class counts. "median" and "trimmed-mean" (Flower's
`trim_mean`, `trim_fraction` cut from each side): of the sites' own scores, unweighted,
for federations that do not trust every site: one site moves them by at most its rank,
not by its share of the records. Under those rules the pooled figure stays beside the
rule's, under `POOLED` + its key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from fed_dplora.class_scores import ClassCounts, summed
from fed_dplora.config import EvaluationSpec
from strategies import wire as p

MACRO_F1 = "eval-macro-f1"  # pooled evaluation metrics computed by the server
RECALL = "eval-recall"  # per class, label order; -1 for a class without test records
POOLED = "pooled-"  # prefix of the pooled figure where the rule is another
SCORES = (p.EVAL_LOSS, p.EVAL_ACCURACY, MACRO_F1, RECALL)  # what a rule replaces


def evaluation_figure(rows: list[dict], spec: EvaluationSpec, prefix: str = "") -> dict:
    """One split's metrics over `rows` (the valid replies' metrics) by `spec.rule`."""
    pooled = pooled_evaluation(rows, prefix)
    if spec.rule == "pooled":
        return pooled
    combine = _site_combiner(spec)
    figure = {**pooled, **{POOLED + prefix + k: pooled[prefix + k] for k in SCORES
                           if prefix + k in pooled}}
    for key in (p.EVAL_LOSS, p.EVAL_ACCURACY):
        figure[prefix + key] = combine([m[prefix + key] for m in rows])
    if prefix + MACRO_F1 in pooled:
        counts = [_counts(m, prefix) for m in rows]
        figure[prefix + MACRO_F1] = combine([c.macro_f1() for c in counts])
        figure[prefix + RECALL] = _combined_recalls(counts, combine)
    return figure


def pooled_evaluation(rows: list[dict], prefix: str = "") -> dict:
    """One split's metrics pooled over sites (keys as the sites send them)."""
    key = lambda name: prefix + name  # noqa: E731
    total = sum(m[key(p.EVAL_WEIGHT)] for m in rows)
    pooled = {key(p.NUM_EXAMPLES): int(sum(m[key(p.NUM_EXAMPLES)] for m in rows)),
              key(p.EVAL_WEIGHT): int(total),
              key(p.EVAL_LOSS): sum(m[key(p.EVAL_LOSS)] * m[key(p.EVAL_WEIGHT)]
                                    for m in rows) / total,
              key(p.EVAL_ACCURACY): sum(m[key(p.EVAL_ACCURACY)] * m[key(p.EVAL_WEIGHT)]
                                        for m in rows) / total}
    if all(key(p.EVAL_CLASS_TRUE) in m for m in rows):
        counts = summed([_counts(m, prefix) for m in rows])
        pooled[key(MACRO_F1)] = counts.macro_f1()
        pooled[key(RECALL)] = [-1.0 if r is None else r for r in counts.recalls()]
    return pooled


def _counts(metrics: dict, prefix: str) -> ClassCounts:
    return ClassCounts(*(tuple(int(x) for x in metrics[prefix + name]) for name in (
        p.EVAL_CLASS_TRUE, p.EVAL_CLASS_PREDICTED, p.EVAL_CLASS_CORRECT)))


def _site_combiner(spec: EvaluationSpec) -> Callable[[Sequence[float]], float]:
    if spec.rule == "median":
        return lambda scores: float(np.median(scores))
    return lambda scores: float(trim_mean(np.asarray(scores, np.float64),
                                          spec.trim_fraction))


def _combined_recalls(counts: list[ClassCounts], combine) -> list[float]:
    """Each class's recall over the sites holding test records of it (-1: none does)."""
    by_class = zip(*(c.recalls() for c in counts))
    return [combine(known) if (known := [r for r in recalls if r is not None]) else -1.0
            for recalls in by_class]
