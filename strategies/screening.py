"""Sorting one round's replies into accepted and failed, before anything is averaged.

A reply is attributed to the node that was asked by its `reply_to_message_id` (an
error reply may come from the SuperLink, e.g. after a node's heartbeat expired, not from
the node). A node fails the round when it answered with an error, did not answer before
the timeout, or sent a reply that does not validate: missing or extra tensors, another
shape or dtype than was sent, NaN/Inf, a foreign LoRA A (FFA), a missing or non-finite
metric, an evaluation inconsistent with its census sizes or itself
(`strategies.evaluation_screening`). Nothing that failed is ever averaged in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from strategies import wire as p
from strategies.evaluation_screening import evaluation_problem
from strategies.wire import to_arrays

log = logging.getLogger("fed_dplora.server")


class ClientFailure(RuntimeError):
    """Too few sites answered validly for the run to go on (census, resume)."""


@dataclass(frozen=True)
class Expected:
    """What a valid reply of one phase carries."""

    arrays: dict[str, tuple[tuple[int, ...], str]] | None  # name -> (shape, dtype); None: none
    metrics: tuple[str, ...]
    a_fingerprint: str | None = None  # FFA: the frozen A every reply must match
    # Per node, where the caller knows them: the training-set size its reply must report
    # (the census's, so a site cannot inflate its weight), and a bound on the norm of
    # its update, reply minus `sent` (fed_dplora.dp.update_bound).
    num_examples: dict[int, int] | None = None
    max_update_norm: dict[int, float] | None = None
    sent: dict[str, np.ndarray] | None = None
    # Evaluation, per node where the census shared them: records per split prefix.
    eval_sizes: dict[int, dict[str, int]] | None = None
    max_eval_weight_per_record: int | None = None  # tokens a record can count (causal-lm)


@dataclass(frozen=True)
class Accepted:
    """A validated reply, decoded once."""

    arrays: dict[str, np.ndarray]  # empty for an evaluation reply
    metrics: dict[str, float]


@dataclass(frozen=True)
class Screened:
    """One phase of one round: who was asked, what was accepted, who failed and why."""

    asked: list[int]
    accepted: dict[int, Accepted]  # node -> its validated reply
    failed: dict[int, str]  # node -> reason
    declined: dict[int, str] = field(default_factory=dict)  # node -> its own limits' reason


class ScreenedMetrics(MetricRecord):
    """A round's aggregated metrics, and (as an attribute, not a record value) how its
    replies were screened: what a caller that charges a privacy ledger or reports
    failures needs from the value `aggregate_train` / `aggregate_evaluate` returns."""

    def __init__(self, values: dict, screened: Screened) -> None:
        super().__init__(values)
        self.screened = screened


def expected_arrays(record: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes of the tensors sent: a reply must return the same."""
    return {name: (tuple(array.shape), array.dtype) for name, array in record.items()}


def screen(sent: list[Message], replies: Iterable[Message], expected: Expected
           ) -> Screened:
    """Attribute every reply to the node asked, validate it, and list the failures."""
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    accepted: dict[int, Accepted] = {}
    failed: dict[int, str] = {}
    declined: dict[int, str] = {}
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id)
        if node is None or node in accepted or node in failed or node in declined:
            log.warning("ignoring a reply to no message of this round (from node %d)",
                        reply.metadata.src_node_id)
            continue
        if reply.has_error():
            failed[node] = f"error reply: {reply.error.reason}"
            continue
        why = reply.content.config_records.get(p.CONFIG, {}).get(p.DECLINED)
        if why:
            declined[node] = str(why)  # the site's own budget: it trained nothing
            continue
        result = validate(reply.content, expected, node)
        if isinstance(result, str):
            failed[node] = result
        else:
            accepted[node] = result
    for node in sorted(set(node_of.values()) - set(accepted) - set(failed) - set(declined)):
        failed[node] = "no reply before the round timeout"
    return Screened(sorted(node_of.values()), accepted, failed, declined)


def validate(content: RecordDict, expected: Expected, node: int | None = None
             ) -> Accepted | str:
    """The decoded reply of `node`, or why it is invalid."""
    if p.METRICS not in content.metric_records:
        return "reply carries no metrics"
    metrics = dict(content[p.METRICS])
    problem = _metrics_problem(metrics, expected.metrics)
    if problem:
        return problem
    if expected.arrays is None:
        problem = evaluation_problem(metrics, (expected.eval_sizes or {}).get(node),
                                     expected.max_eval_weight_per_record)
        return problem or Accepted({}, metrics)
    if p.ARRAYS not in content.array_records:
        return "reply carries no tensors"
    arrays = to_arrays(content[p.ARRAYS])
    problem = (_arrays_problem(arrays, expected.arrays)
               or _fingerprint_problem(content, expected.a_fingerprint)
               or _node_problem(node, arrays, metrics, expected))
    return problem or Accepted(arrays, metrics)


def _node_problem(node: int | None, arrays: dict[str, np.ndarray], metrics: dict,
                  expected: Expected) -> str | None:
    """A reply reporting another size than the census, or moving further than an
    honest DP-SGD update could."""
    size = (expected.num_examples or {}).get(node)
    if size is not None and metrics[p.NUM_EXAMPLES] != size:
        return (f"reports {p.NUM_EXAMPLES}={metrics[p.NUM_EXAMPLES]:g}, its census size is "
                f"{size}: a site's weight is fixed by the census")
    bound = (expected.max_update_norm or {}).get(node)
    if bound is None:
        return None
    norm = float(np.sqrt(sum(np.sum((arrays[k].astype(np.float64)
                                     - expected.sent[k].astype(np.float64)) ** 2)
                             for k in arrays)))
    if norm > bound:
        return (f"update norm {norm:.4g} exceeds {bound:.4g}, the DP-aware bound on an "
                "honest update under this site's plan")
    return None


def _fingerprint_problem(content: RecordDict, a_fingerprint: str | None) -> str | None:
    if a_fingerprint is None:
        return None
    config = content.config_records.get(p.CONFIG, {})
    fingerprint = str(config.get(p.A_FINGERPRINT, ""))
    if fingerprint == a_fingerprint:
        return None
    return (f"trained with a different LoRA A (fingerprint {fingerprint[:12] or 'none'} vs "
            f"the server's {a_fingerprint[:12]}): under FFA every A must come from the "
            "same seed and model; check that all sites run the same fed-dplora, model, "
            "seed and lora.*")


def _metrics_problem(metrics: dict, required: tuple[str, ...]) -> str | None:
    missing = [k for k in required if k not in metrics]
    if missing:
        return f"metrics {missing} missing"
    bad = [k for k, v in metrics.items()
           if not all(math.isfinite(float(x)) for x in (v if isinstance(v, list) else [v]))]
    if bad:
        return f"metrics {bad} are not finite numbers"
    if p.NUM_EXAMPLES in required and metrics[p.NUM_EXAMPLES] <= 0:
        return f"{p.NUM_EXAMPLES}={metrics[p.NUM_EXAMPLES]} is not positive"
    return None


def _arrays_problem(arrays: dict[str, np.ndarray],
                    expected: dict[str, tuple[tuple[int, ...], str]]) -> str | None:
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        return (f"tensor names differ from those the round trains: missing {missing[:3]}, "
                f"extra {extra[:3]}")
    for name, array in arrays.items():
        shape, dtype = expected[name]
        if (array.shape, str(array.dtype)) != (shape, dtype):
            return f"{name}: shape {array.shape} dtype {array.dtype}, expected {shape} {dtype}"
        if not np.isfinite(array).all():
            return f"{name} holds NaN or Inf"
    return None


@dataclass
class SiteHealth:
    """Consecutive failures per node; a node that fails `max_failures` times in a row,
    or declines a round by its own privacy limits, is no longer asked (with a warning)."""

    max_failures: int = 3
    streak: dict[int, int] = field(default_factory=dict)
    excluded: set[int] = field(default_factory=set)

    def restore(self, excluded: list[str], streaks: dict[str, int],
                node_of: dict[str, int]) -> None:
        """A resumed run's exclusions and streaks, saved by site id (`node_of`: the
        sites connected now)."""
        self.excluded = {node_of[s] for s in excluded if s in node_of}
        self.streak = {node_of[s]: k for s, k in streaks.items() if s in node_of}

    def update(self, screened: Screened, phase: str, server_round: int) -> None:
        for node, why in sorted(screened.declined.items()):
            self.excluded.add(node)
            log.warning("round %d: node %d is out of budget by its own limits and is no "
                        "longer asked: %s", server_round, node, why)
        for node in screened.accepted:
            self.streak[node] = 0
        for node, reason in sorted(screened.failed.items()):
            self.streak[node] = self.streak.get(node, 0) + 1
            log.warning("round %d %s: node %d failed: %s", server_round, phase, node, reason)
            if self.streak[node] >= self.max_failures and node not in self.excluded:
                self.excluded.add(node)
                log.warning("node %d failed %d times in a row: it is no longer asked to "
                            "train or evaluate in this run", node, self.streak[node])
