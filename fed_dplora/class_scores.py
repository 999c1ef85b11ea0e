"""Macro-F1 and per-class recall from per-class counts summed over sites.

Counts, not per-site scores: the federation's macro-F1 is that of the pooled test set,
which a mean of the sites' own scores is not (a site that never sees a class would score
it 0, or not at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ClassCounts:
    """Per class k: test records of class k, predictions of k, and correct predictions
    of k (records of class k predicted as k)."""

    true: tuple[int, ...]
    predicted: tuple[int, ...]
    correct: tuple[int, ...]

    def __add__(self, other: "ClassCounts") -> "ClassCounts":
        if len(self.true) != len(other.true):
            raise ValueError(f"class counts of {len(self.true)} and {len(other.true)} "
                             "classes cannot be added")
        return ClassCounts(*(tuple(a + b for a, b in zip(mine, theirs)) for mine, theirs in
                             ((self.true, other.true), (self.predicted, other.predicted),
                              (self.correct, other.correct))))

    def recalls(self) -> tuple[float | None, ...]:
        """Recall of each class; None for a class without test records."""
        return tuple(c / t if t else None for c, t in zip(self.correct, self.true))

    def macro_f1(self) -> float:
        """Mean F1 over the classes that occur in the test records or the predictions
        (scikit-learn's `f1_score(average="macro")`; 0 where precision + recall is 0)."""
        scores = []
        for true, predicted, correct in zip(self.true, self.predicted, self.correct):
            if true == 0 and predicted == 0:
                continue
            scores.append(2 * correct / (true + predicted))
        return sum(scores) / len(scores) if scores else 0.0


def summed(counts: Sequence[ClassCounts]) -> ClassCounts:
    total = counts[0]
    for more in counts[1:]:
        total = total + more
    return total
