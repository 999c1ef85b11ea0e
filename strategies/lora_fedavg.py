"""FedAvg over the LoRA tensors that travel (FFA: B and head; vanilla: A, B and head).

Fails closed: a client error, a missing reply, or (FFA) a reply whose frozen `A` differs
from the server's is an error that stops the run, never a silently skipped client.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fed_dplora import protocol as p
from fed_dplora.aggregation import aggregation_error, weighted_mean
from fed_dplora.dp.noise import RandomSource
from strategies.replies import ClientFailure, checked_replies


@dataclass(frozen=True)
class TrainRound:
    arrays: dict[str, np.ndarray]
    client_metrics: dict[int, dict[str, float]]  # node id -> reply metrics
    aggregation_error: float
    bytes_up: int
    update_clip_fraction: float | None = None  # client-level DP only


class LoraFedAvg:
    """Weighted FedAvg (weights: training-set sizes) over what travels."""

    def __init__(self, a_fingerprint: str | None, shared: dict[str, np.ndarray]) -> None:
        self.a_fingerprint = a_fingerprint  # FFA: the frozen A every reply must match
        self.shared = shared  # tensors that never travel (A under FFA)

    def train_messages(self, arrays: dict[str, np.ndarray],
                       configs: dict[int, ConfigRecord]) -> list[Message]:
        record = to_record(arrays)
        return [Message(RecordDict({p.ARRAYS: record, p.CONFIG: config}),
                        dst_node_id=node, message_type=MessageType.TRAIN)
                for node, config in configs.items()]

    def evaluate_messages(self, arrays: dict[str, np.ndarray], nodes: list[int],
                          config: ConfigRecord) -> list[Message]:
        record = to_record(arrays)
        return [Message(RecordDict({p.ARRAYS: record, p.CONFIG: config}),
                        dst_node_id=node, message_type=MessageType.EVALUATE)
                for node in nodes]

    def aggregate_train(self, replies: list[Message], expected: list[int],
                        global_arrays: dict[str, np.ndarray], rng: RandomSource
                        ) -> TrainRound:
        """Weighted mean of the replies (no replies: the global tensors unchanged)."""
        updates, weights, metrics, bytes_up = self.collect(replies, expected)
        if not updates:
            return TrainRound(global_arrays, {}, 0.0, 0)
        return TrainRound(weighted_mean(updates, weights), metrics,
                          aggregation_error(updates, weights, self.shared), bytes_up)

    def collect(self, replies: list[Message], expected: list[int]
                ) -> tuple[list[dict[str, np.ndarray]], list[float],
                           dict[int, dict[str, float]], int]:
        """Checked replies -> (tensors, example counts, metrics by node, bytes up)."""
        replies = checked_replies(replies, expected, "train")
        updates, weights, metrics, bytes_up = [], [], {}, 0
        for reply in replies:
            node = reply.metadata.src_node_id
            fingerprint = reply.content[p.CONFIG][p.A_FINGERPRINT]
            if self.a_fingerprint is not None and fingerprint != self.a_fingerprint:
                raise ClientFailure(
                    f"node {node} trained with a different LoRA A (fingerprint "
                    f"{fingerprint[:12]} vs the server's {self.a_fingerprint[:12]}): "
                    "under FFA every A must come from the same seed and model; check "
                    "that all sites run the same fed-dplora, model, seed and lora.*")
            update = {name: array.numpy() for name, array in reply.content[p.ARRAYS].items()}
            bytes_up += payload_bytes(update)
            updates.append(update)
            metrics[node] = dict(reply.content[p.METRICS])
            weights.append(float(metrics[node][p.NUM_EXAMPLES]))
        return updates, weights, metrics, bytes_up

    @staticmethod
    def aggregate_evaluate(replies: list[Message], expected: list[int]
                           ) -> tuple[float, float, int]:
        """(loss, accuracy, examples) over the union of the clients' test sets."""
        rows = [r.content[p.METRICS] for r in checked_replies(replies, expected, "evaluate")]
        total = sum(int(m[p.NUM_EXAMPLES]) for m in rows)
        loss = sum(m[p.EVAL_LOSS] * m[p.NUM_EXAMPLES] for m in rows) / max(total, 1)
        accuracy = sum(m[p.EVAL_ACCURACY] * m[p.NUM_EXAMPLES] for m in rows) / max(total, 1)
        return float(loss), float(accuracy), total


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array.from_numpy_ndarray(a) for name, a in arrays.items()})


def payload_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Tensor bytes that travel (serialization headers not counted)."""
    return sum(a.nbytes for a in arrays.values())

