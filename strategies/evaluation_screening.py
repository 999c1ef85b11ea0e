"""What an evaluation reply must be consistent with before it is pooled: the census's
size of each split it reports, and its own numbers (per-class counts that sum to its
records, hits within them, an accuracy equal to the hits over the records, a loss that
is a cross-entropy). A reply that breaks any of these fails, with a reason naming the
field, as a bad training reply does. A site can still report a wrong but consistent
score for its own test set."""

from __future__ import annotations

from strategies import wire as p

# Split prefixes an evaluation reply may carry; a personal split is the same records
# under the site's own tensors (FedSA), so it has the plain split's census size.
SPLITS = ("", p.VALIDATION, p.PERSONAL, p.PERSONAL + p.VALIDATION)
COUNTS = (p.EVAL_CLASS_TRUE, p.EVAL_CLASS_PREDICTED, p.EVAL_CLASS_CORRECT)
ACCURACY_TOLERANCE = 1e-6


def evaluation_problem(metrics: dict, census: dict[str, int] | None,
                       max_weight_per_record: int | None = None) -> str | None:
    """Why the reply is not consistent, or None. `census`: the node's records per split
    prefix ("" test, `p.VALIDATION`), as its census reported them (None: unknown);
    `max_weight_per_record`: the most one record can count in its weight (None: any)."""
    for prefix in SPLITS:
        if prefix + p.EVAL_WEIGHT not in metrics:
            continue
        size = None if census is None else census.get(prefix.removeprefix(p.PERSONAL), -1)
        problem = (_size_problem(metrics, prefix, size)
                   or _weight_problem(metrics, prefix, max_weight_per_record)
                   or _loss_problem(metrics, prefix)
                   or _counts_problem(metrics, prefix))
        if problem:
            return problem
    return None


def _size_problem(metrics: dict, prefix: str, size: int | None) -> str | None:
    records, weight = metrics[prefix + p.NUM_EXAMPLES], metrics[prefix + p.EVAL_WEIGHT]
    if size == -1:
        return f"reports a split ({prefix + p.EVAL_WEIGHT}) its census did not"
    if size is not None and records != size:
        return (f"reports {prefix + p.NUM_EXAMPLES}={records:g}, its census size for that "
                f"split is {size}: a site's evaluation weight is fixed by the census")
    if records < 1 or records != int(records) or weight < 1 or weight != int(weight):
        return (f"{prefix + p.NUM_EXAMPLES}={records:g} and {prefix + p.EVAL_WEIGHT}="
                f"{weight:g} must be whole numbers of at least 1")
    return None


def _weight_problem(metrics: dict, prefix: str, per_record: int | None) -> str | None:
    """A weight more than its records can count (causal-lm: predicted tokens, at most
    model.max-length - 1 a record)."""
    records, weight = metrics[prefix + p.NUM_EXAMPLES], metrics[prefix + p.EVAL_WEIGHT]
    if per_record is not None and weight > records * per_record:
        return (f"{prefix + p.EVAL_WEIGHT}={weight:g} exceeds what its {records:g} records "
                f"can count ({per_record} each)")
    return None


def _loss_problem(metrics: dict, prefix: str) -> str | None:
    loss, accuracy = metrics[prefix + p.EVAL_LOSS], metrics[prefix + p.EVAL_ACCURACY]
    if loss < 0:
        return (f"{prefix + p.EVAL_LOSS}={loss:g} is negative: a mean cross-entropy is at "
                "least 0 (a perplexity at least 1)")
    if not 0 <= accuracy <= 1:
        return f"{prefix + p.EVAL_ACCURACY}={accuracy:g} is outside [0, 1]"
    return None


def _counts_problem(metrics: dict, prefix: str) -> str | None:
    """Classification's per-class counts against the reply's records and accuracy."""
    present = [prefix + k for k in COUNTS if prefix + k in metrics]
    if not present:
        return None
    if len(present) < len(COUNTS):
        return f"reports {present} without the other per-class counts"
    true, predicted, correct = (list(metrics[prefix + k]) for k in COUNTS)
    records = metrics[prefix + p.NUM_EXAMPLES]
    if not len(true) == len(predicted) == len(correct):
        return f"{prefix}per-class counts of different lengths"
    if any(c < 0 or c != int(c) for c in true + predicted + correct):
        return f"{prefix}per-class counts must be whole numbers of at least 0"
    if sum(true) != records or sum(predicted) != records:
        return (f"{prefix + p.EVAL_CLASS_TRUE} sums to {sum(true):g} and "
                f"{prefix + p.EVAL_CLASS_PREDICTED} to {sum(predicted):g}, not its "
                f"{records:g} records")
    if any(c > min(t, q) for t, q, c in zip(true, predicted, correct)):
        return (f"{prefix + p.EVAL_CLASS_CORRECT} exceeds a class's true or predicted "
                "count")
    if metrics[prefix + p.EVAL_WEIGHT] != records:
        return f"{prefix + p.EVAL_WEIGHT} differs from its records (classification)"
    if abs(metrics[prefix + p.EVAL_ACCURACY] - sum(correct) / records) > ACCURACY_TOLERANCE:
        return (f"{prefix + p.EVAL_ACCURACY}={metrics[prefix + p.EVAL_ACCURACY]:g} is not "
                f"its hits over its records ({sum(correct):g}/{records:g})")
    return None
