"""FedAvg over what travels, the aggregation error, and the strategy's refusals."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fed_dplora import protocol as p
from fed_dplora.aggregation import aggregation_error, weighted_mean
from fed_dplora.dp.noise import SeededRandom
from strategies.lora_fedavg import ClientFailure, LoraFedAvg, to_record

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"
rng = np.random.default_rng(0)


def client(a=None):
    update = {B: rng.normal(size=(6, 2)).astype(np.float32)}
    if a is not None:
        update[A] = a
    return update


def test_weighted_mean_weights_by_examples():
    ups = [{B: np.ones((2, 2), np.float32)}, {B: np.full((2, 2), 4.0, np.float32)}]
    assert np.allclose(weighted_mean(ups, [3.0, 1.0])[B], 1.75)
    with pytest.raises(ValueError, match="different tensors"):
        weighted_mean([ups[0], {"other": ups[1][B]}], [1.0, 1.0])


def test_ffa_error_is_zero_and_vanilla_error_is_not():
    shared_a = rng.normal(size=(2, 5)).astype(np.float32)
    ffa = [client() for _ in range(3)]
    assert aggregation_error(ffa, [1, 2, 3], {A: shared_a}) < 1e-12
    vanilla = [client(rng.normal(size=(2, 5)).astype(np.float32)) for _ in range(3)]
    err = aggregation_error(vanilla, [1, 2, 3], {})
    assert 0.05 < err < 10
    # the same A everywhere makes vanilla exact too
    same = [{**u, A: shared_a} for u in vanilla]
    assert aggregation_error(same, [1, 2, 3], {}) < 1e-12


@pytest.fixture(autouse=True)
def flower_task(monkeypatch):
    """Messages outside a Flower run need a task identity; the reply's src is node_id."""
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def reply(node: int, fingerprint: str, update: dict) -> Message:
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    TaskIdentity.node_id = node
    content = RecordDict({p.ARRAYS: to_record(update),
                          p.METRICS: MetricRecord({p.NUM_EXAMPLES: 10}),
                          p.CONFIG: ConfigRecord({p.A_FINGERPRINT: fingerprint})})
    return Message(content, reply_to=request)


def test_strategy_refuses_a_reply_trained_with_a_different_a():
    strategy = LoraFedAvg("aaaa", {})
    ok = reply(1, "aaaa", client())
    assert strategy.aggregate_train([ok], [ok.metadata.src_node_id], {},
                                    SeededRandom(0)).bytes_up == 6 * 2 * 4
    bad = reply(2, "bbbb", client())
    with pytest.raises(ClientFailure, match="different LoRA A"):
        strategy.aggregate_train([ok, bad], [ok.metadata.src_node_id,
                                             bad.metadata.src_node_id], {}, SeededRandom(0))


def test_vanilla_strategy_accepts_trained_a():
    first, second = reply(1, "aaaa", client()), reply(2, "cccc", client())
    nodes = [first.metadata.src_node_id, second.metadata.src_node_id]
    assert LoraFedAvg(None, {}).aggregate_train([first, second], nodes, {},
                                                SeededRandom(0)).bytes_up == 96


def test_strategy_refuses_missing_replies():
    ok = reply(1, "aaaa", client())
    with pytest.raises(ClientFailure, match="no reply from node"):
        LoraFedAvg("aaaa", {}).aggregate_train([ok], [ok.metadata.src_node_id, 99], {},
                                               SeededRandom(0))
