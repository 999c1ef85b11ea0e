"""Flower Message-API strategies over the LoRA tensors that train.

`LoraFedAvg` (the vanilla baseline: A, B and head travel) and `FfaFedAvg` (FFA: only B
and the head travel; every reply's frozen A must match the server's) subclass Flower's
`FedAvg`, so a user can drop them into any ServerApp and call `start()`. They differ
from FedAvg where a hospital network needs it:

- a site that fails (error reply, no reply before the timeout, an invalid reply: see
  `strategies.screening`) costs its contribution to that round, never the run; the
  round aggregates the valid replies if at least `min_replies` arrived (default: every
  site asked), else it is lost (no new arrays) and the next one starts;
- a node that fails `max_site_failures` times in a row is no longer asked;
- nodes are sampled with the OS CSPRNG (FedAvg uses an unseeded `random.sample`), or by
  a `node_sampler` the caller gives (the project's ServerApp: seeded in simulation);
- a `method` that alternates (RoLoRA) trains a part of the tensors sent in each round:
  replies carry that part, the rest is held at the values sent;
- the round's MetricRecord carries the aggregation error
  ||mean_i(B_i A_i) - mean(B) mean(A)||_F / ||mean_i(B_i A_i)||_F (0 for FFA).

The MetricRecords `aggregate_train` and `aggregate_evaluate` return carry how the
round's replies were screened (`ScreenedMetrics.screened`), for a caller that charges a
privacy ledger or reports failures.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from fed_dplora.aggregation import aggregation_error, capped_weights, weighted_mean
from fed_dplora.config import AggregationSpec, EvaluationSpec
from fed_dplora.methods.base import LoraMethod
from fed_dplora.seeds import derived_seed
from strategies import wire as p
from strategies.evaluation_pooling import evaluation_figure
from strategies.screening import (
    Expected,
    Screened,
    ScreenedMetrics,
    SiteHealth,
    expected_arrays,
    screen,
)
from strategies.wire import to_arrays, to_record

log = logging.getLogger("fed_dplora.server")

# What a privacy ledger needs from every train reply; train loss and clip fraction come
# only from sites that share them (node config share-metrics).
TRAIN_METRICS = (p.NUM_EXAMPLES, p.STEPS, p.SAMPLING_PROBABILITY, p.NOISE_MULTIPLIER)
EVALUATE_METRICS = (p.NUM_EXAMPLES, p.EVAL_LOSS, p.EVAL_ACCURACY, p.EVAL_WEIGHT)

# (server round, nodes that may be asked) -> the nodes asked to train this round
NodeSampler = Callable[[int, list[int]], list[int]]
# (server round, node, the round's shared config) -> that node's config
NodeConfig = Callable[[int, int, ConfigRecord], ConfigRecord]


class LoraFedAvg(FedAvg):
    """FedAvg weighted by training-set size over the tensors that travel."""

    def __init__(self, *, shared_arrays: dict[str, np.ndarray] | None = None,
                 a_fingerprint: str | None = None, min_replies: int | None = None,
                 max_site_failures: int = 3, node_sampler: NodeSampler | None = None,
                 node_config: NodeConfig | None = None, nodes: set[int] | None = None,
                 evaluators: set[int] | None = None, sizes: dict[int, int] | None = None,
                 eval_sizes: dict[int, dict[str, int]] | None = None,
                 update_bounds: dict[int, float] | None = None,
                 max_eval_weight_per_record: int | None = None,
                 aggregation: AggregationSpec = AggregationSpec(),
                 evaluation: EvaluationSpec = EvaluationSpec(),
                 evaluation_sampler: NodeSampler | None = None,
                 method: LoraMethod | None = None, **fedavg_kwargs) -> None:
        super().__init__(weighted_by_key=p.NUM_EXAMPLES, arrayrecord_key=p.ARRAYS,
                         configrecord_key=p.CONFIG, **fedavg_kwargs)
        self.shared_arrays = shared_arrays or {}  # tensors that never travel (FFA's A)
        self.a_fingerprint = a_fingerprint
        self.min_replies = min_replies
        self.health = SiteHealth(max_site_failures)
        self.node_sampler = node_sampler or self.sample_securely
        self.node_config = node_config or per_node_seed
        self.nodes = nodes  # None: every connected node may be asked
        self.evaluators = evaluators  # None: every node that may be asked evaluates
        # node -> census training-set size: the weight, and what its reply must report
        # (None: each reply's own num-examples, as Flower's FedAvg weights)
        self.sizes = sizes
        # node -> census records per evaluation split ("" test, wire.VALIDATION): what
        # its evaluation replies must report (None, or a node missing: unchecked)
        self.eval_sizes = eval_sizes
        # the most an evaluation reply's weight may be per record: 1 (classification),
        # the predicted tokens of a record at model.max-length (causal-lm); None: unchecked
        self.max_eval_weight_per_record = max_eval_weight_per_record
        self.update_bounds = update_bounds  # node -> DP-aware bound on its update norm
        self.aggregation = aggregation
        self.evaluation = evaluation  # its rule makes the reported figure
        # (server round, evaluators that may be asked) -> those asked (None: FedAvg's
        # fraction_evaluate of them, from the OS CSPRNG)
        self.evaluation_sampler = evaluation_sampler
        self.method = method  # None: every tensor sent trains every round
        self._sent: dict[tuple[int, str], tuple[list[Message], Expected]] = {}
        # server round -> (the global tensors sent to train, the names that train)
        self._rounds: dict[int, tuple[dict[str, np.ndarray], set[str]]] = {}

    @classmethod
    def for_model(cls, model, **kwargs) -> "LoraFedAvg":
        """A strategy for `model` (built by `fed_dplora.lora.model.build_lora_model`):
        its frozen LoRA factors for the aggregation error and, for FFA and Frozen-AB-R,
        their fingerprint."""
        from fed_dplora.lora.adapters import frozen_lora_factors, frozen_lora_fingerprint
        shared = frozen_lora_factors(model)
        if cls is FfaFedAvg:
            kwargs["a_fingerprint"] = frozen_lora_fingerprint(model)
        return cls(shared_arrays=shared, **kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        nodes = self.node_sampler(server_round, self.askable_nodes(grid))
        sent = to_arrays(arrays)
        trained = self.trained(server_round, sent)
        self._rounds[server_round] = (sent, trained)
        shapes = {k: v for k, v in expected_arrays(arrays).items() if k in trained}
        expected = Expected(shapes, TRAIN_METRICS, self.a_fingerprint, self.sizes,
                            self.update_bounds, sent if self.update_bounds else None)
        return self._messages(server_round, arrays, config, nodes, MessageType.TRAIN,
                              expected)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The valid replies combined by `aggregation.rule` (with what the round held);
        None when the round is lost."""
        sent, trained = self.pop_round(server_round)
        screened = self.screen_train(server_round, replies)
        if self.is_lost(screened):
            return None, self.train_metrics(screened, None, lost=True)
        updates, weights = self.updates(screened)
        if not updates:
            return None, self.train_metrics(screened, None, lost=True)
        combined = self.combine(updates, weights)
        error = aggregation_error(updates, weights, self.held(sent, trained),
                                  None if self.aggregation.rule == "mean" else combined)
        return to_record(released(sent, combined)), self.train_metrics(screened, error)

    def combine(self, updates: list[dict[str, np.ndarray]], weights: list[float]
                ) -> dict[str, np.ndarray]:
        """The weighted mean, or Flower's coordinate-wise trimmed mean or median."""
        rule = self.aggregation.rule
        if rule == "mean":
            return weighted_mean(updates, weights)
        stacked = {k: np.stack([u[k] for u in updates]) for k in sorted(updates[0])}
        if rule == "median":  # as FedMedian
            return {k: np.median(v, axis=0).astype(np.float32) for k, v in stacked.items()}
        return {k: np.asarray(trim_mean(v, self.aggregation.trim_fraction), np.float32)
                for k, v in stacked.items()}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The nodes that may be asked and evaluate: those `evaluation_sampler` draws, or
        fraction_evaluate of them."""
        nodes = [n for n in self.askable_nodes(grid)
                 if self.evaluators is None or n in self.evaluators]
        if self.fraction_evaluate == 0.0 or not nodes:
            return []
        if self.evaluation_sampler is not None:
            nodes = self.evaluation_sampler(server_round, nodes)
        else:
            count = max(int(len(nodes) * self.fraction_evaluate), 1)
            nodes = sorted(random.SystemRandom().sample(nodes, count))
        return self._messages(server_round, arrays, config, nodes, MessageType.EVALUATE,
                              Expected(None, EVALUATE_METRICS, eval_sizes=self.eval_sizes,
                                       max_eval_weight_per_record=(
                                           self.max_eval_weight_per_record)))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> ScreenedMetrics:
        """Loss, accuracy (and for classification macro-F1 and per-class recall) of the
        valid replies' test sets, and of their validation splits where every reply has
        one (and the same under each site's own tensors, FedSA), by `evaluation.rule`
        (`strategies.evaluation_pooling`); only the counts where no reply evaluated
        anything."""
        screened = self._screen(server_round, MessageType.EVALUATE, replies)
        rows = [r.metrics for r in screened.accepted.values()]
        record = ScreenedMetrics({"replies": len(rows), "failures": len(screened.failed)},
                                 screened)
        if not sum(m[p.EVAL_WEIGHT] for m in rows):
            return record
        record.update(evaluation_figure(rows, self.evaluation))
        for split in (p.VALIDATION, p.PERSONAL, p.PERSONAL + p.VALIDATION):
            if all(split + p.EVAL_WEIGHT in m for m in rows):
                record.update(evaluation_figure(rows, self.evaluation, split))
        return record

    # Shared with the client-level DP wrapper.
    def trained(self, server_round: int, sent: dict[str, np.ndarray]) -> set[str]:
        """The tensors sent that train (and come back) in `server_round`."""
        return set(sent) if self.method is None else self.method.trained(sent, server_round)

    def pop_round(self, server_round: int) -> tuple[dict[str, np.ndarray], set[str]]:
        """What `configure_train` sent for the round, and which of it trains."""
        return self._rounds.pop(server_round, ({}, set()))

    def held(self, sent: dict[str, np.ndarray], trained: set[str]
             ) -> dict[str, np.ndarray]:
        """The tensors identical on every site this round: those that never travel
        (FFA's A) and those sent that did not train (RoLoRA's)."""
        return {**self.shared_arrays, **{k: v for k, v in sent.items() if k not in trained}}

    def screen_train(self, server_round: int, replies: Iterable[Message]) -> Screened:
        return self._screen(server_round, MessageType.TRAIN, replies)

    def is_lost(self, screened: Screened) -> bool:
        """Fewer valid replies than `min_replies` (None: every node asked that did not
        decline by its own limits, and at least one when any was asked: a round every
        asked site declined trained nothing and is lost; one that asked nobody, as
        Poisson sampling may, is not)."""
        asked, declined = len(screened.asked), len(screened.declined)
        needed = (max(min(asked, 1), asked - declined) if self.min_replies is None
                  else self.min_replies)
        lost = len(screened.accepted) < needed
        if lost:
            log.warning("round lost: %d valid replies of %d asked, min-replies %d",
                        len(screened.accepted), len(screened.asked), needed)
        return lost

    def updates(self, screened: Screened) -> tuple[list[dict[str, np.ndarray]], list[float]]:
        """The accepted tensors and their weights, by node: census training-set sizes
        (or each reply's num-examples where no census is known) or uniform, with no
        site above `aggregation.max_weight_share`."""
        nodes = sorted(screened.accepted)
        if not nodes:
            return [], []
        if self.aggregation.weights == "uniform":
            raw = [1.0] * len(nodes)
        elif self.sizes is not None:
            raw = [float(self.sizes[n]) for n in nodes]
        else:
            raw = [float(screened.accepted[n].metrics[p.NUM_EXAMPLES]) for n in nodes]
        return ([screened.accepted[n].arrays for n in nodes],
                capped_weights(raw, self.aggregation.max_weight_share))

    @staticmethod
    def train_metrics(screened: Screened, error: float | None, lost: bool = False
                      ) -> ScreenedMetrics:
        """The round's MetricRecord: `lost` 1 when no aggregate was released; the
        aggregation error where one is defined (not where B never leaves, FedSA)."""
        rows = [a.metrics for a in screened.accepted.values()]
        metrics = ScreenedMetrics({"replies": len(rows), "failures": len(screened.failed),
                                   "lost": int(lost)}, screened)
        if error is not None:
            metrics["aggregation-error"] = error
        for key in (p.TRAIN_LOSS, p.CLIP_FRACTION):  # from the sites that share them
            shared = [r[key] for r in rows if key in r]
            if shared:
                metrics[key] = float(np.mean(shared))
        return metrics

    def askable_nodes(self, grid: Grid) -> list[int]:
        """Connected nodes (of `nodes`, if given), less those excluded for failing;
        waits for `min_available_nodes` to connect, as FedAvg does."""
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            log.info("waiting for nodes: %d connected, %d needed", len(nodes),
                     self.min_available_nodes)
            time.sleep(1)
        return [n for n in nodes if n not in self.health.excluded
                and (self.nodes is None or n in self.nodes)]

    def sample_securely(self, server_round: int, nodes: list[int]) -> list[int]:
        """FedAvg's sample size (fraction_train, at least min_train_nodes), drawn
        with the OS CSPRNG: who takes part is not predictable from anything public."""
        count = min(max(int(len(nodes) * self.fraction_train), self.min_train_nodes),
                    len(nodes))
        return sorted(random.SystemRandom().sample(nodes, count))

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  nodes: list[int], message_type: str, expected: Expected) -> list[Message]:
        shared = ConfigRecord({**config, "server-round": server_round})
        messages = [Message(RecordDict({p.ARRAYS: arrays, p.CONFIG: self.node_config(
                        server_round, node, shared)}), dst_node_id=node,
                            message_type=message_type) for node in nodes]
        # Kept: the grid gives each message its id when it sends it; replies name it.
        self._sent[(server_round, message_type)] = (messages, expected)
        return messages

    def _screen(self, server_round: int, message_type: str, replies: Iterable[Message]
                ) -> Screened:
        messages, expected = self._sent.pop((server_round, message_type), ([], None))
        screened = screen(messages, replies, expected)
        self.health.update(screened, message_type, server_round)
        return screened


class FfaFedAvg(LoraFedAvg):
    """FFA-LoRA: every A frozen at the same seeded init, only B (and the head) travel
    and are averaged, which is exact; a reply whose fingerprint of the frozen factors
    differs from `a_fingerprint` is rejected. Build it with
    `FfaFedAvg.for_model(model, ...)`; it serves Frozen-AB-R too (A and B frozen, R travels)."""

    def __init__(self, *, a_fingerprint: str, shared_arrays: dict[str, np.ndarray],
                 **kwargs) -> None:
        if not a_fingerprint or not shared_arrays:
            raise ValueError("FfaFedAvg needs the frozen A tensors and their fingerprint: "
                             "build it with FfaFedAvg.for_model(model) from an FFA model")
        super().__init__(a_fingerprint=a_fingerprint, shared_arrays=shared_arrays, **kwargs)


def released(sent: dict[str, np.ndarray], combined: dict[str, np.ndarray]
             ) -> dict[str, np.ndarray]:
    """The new global tensors, by name: the combined ones, and those the round held."""
    return {k: combined[k] if k in combined else sent[k] for k in sorted(sent)}


def per_node_seed(server_round: int, node: int, config: ConfigRecord) -> ConfigRecord:
    """The default node config: the shared one, with a per-node, per-round seed derived
    from its `round-seed` (so seeded clients never draw the same noise)."""
    config = ConfigRecord(dict(config))
    if p.ROUND_SEED in config:
        config[p.ROUND_SEED] = derived_seed(int(config[p.ROUND_SEED]), server_round, str(node))
    return config
