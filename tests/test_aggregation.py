"""FedAvg over what travels, the aggregation error, and the strategies' screening of
replies: what is accepted is averaged exactly, what is invalid never is."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers import NodesOnly

from fed_dplora.aggregation import aggregation_error, weighted_mean
from fed_dplora.dp.noise import SeededRandom
from strategies import ClientLevelDpFedAvg, FfaFedAvg, LoraFedAvg, to_arrays, to_record
from strategies import wire as p
from strategies.lora_fedavg import per_node_seed

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"
FINGERPRINT = "a" * 64


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def client(rng, a=None):
    update = {B: rng.normal(size=(6, 2)).astype(np.float32)}
    if a is not None:
        update[A] = a
    return update


def test_weighted_mean_weights_by_examples():
    ups = [{B: np.ones((2, 2), np.float32)}, {B: np.full((2, 2), 4.0, np.float32)}]
    assert np.allclose(weighted_mean(ups, [3.0, 1.0])[B], 1.75)
    with pytest.raises(ValueError, match="different tensors"):
        weighted_mean([ups[0], {"other": ups[1][B]}], [1.0, 1.0])


def test_ffa_error_is_zero_and_vanilla_error_is_not(rng):
    shared_a = rng.normal(size=(2, 5)).astype(np.float32)
    ffa = [client(rng) for _ in range(3)]
    assert aggregation_error(ffa, [1, 2, 3], {A: shared_a}) < 1e-12
    vanilla = [client(rng, rng.normal(size=(2, 5)).astype(np.float32)) for _ in range(3)]
    assert aggregation_error(vanilla, [1, 2, 3], {}) > 0.05
    # the same A everywhere makes vanilla exact too
    same = [{**u, A: shared_a} for u in vanilla]
    assert aggregation_error(same, [1, 2, 3], {}) < 1e-12


@pytest.fixture(autouse=True)
def flower_task(monkeypatch):
    """Messages outside a Flower run need a task identity; the reply's src is node_id."""
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def ffa(**kwargs) -> FfaFedAvg:
    return FfaFedAvg(a_fingerprint=FINGERPRINT, shared_arrays={A: np.ones((2, 2), np.float32)},
                     min_available_nodes=0, **kwargs)


def send(strategy, nodes, rnd=1) -> dict[int, Message]:
    """Configure a round over `nodes` and give the messages ids, as a grid does."""
    global_arrays = {B: np.zeros((6, 2), np.float32)}
    messages = strategy.configure_train(rnd, to_record(global_arrays),
                                        ConfigRecord({p.ROUND_SEED: 7}), NodesOnly(nodes))
    for message in messages:
        message.metadata.__dict__["_message_id"] = f"r{rnd}-n{message.metadata.dst_node_id}"
    return {m.metadata.dst_node_id: m for m in messages}


def answer(message, update, examples=10, fingerprint=FINGERPRINT, **metrics) -> Message:
    TaskIdentity.node_id = message.metadata.dst_node_id
    values = {p.NUM_EXAMPLES: examples, p.STEPS: 2, p.SAMPLING_PROBABILITY: 0.1,
              p.NOISE_MULTIPLIER: 1.0, p.TRAIN_LOSS: 0.5, p.CLIP_FRACTION: 0.2, **metrics}
    content = RecordDict({p.ARRAYS: to_record(update),
                          p.METRICS: MetricRecord({k: v for k, v in values.items()
                                                   if v is not None}),
                          p.CONFIG: ConfigRecord({p.A_FINGERPRINT: fingerprint})})
    reply = Message(content, reply_to=message)
    TaskIdentity.node_id = 0
    return reply


def test_valid_replies_are_averaged_by_examples_and_a_nan_reply_never(rng):
    strategy = ffa(node_sampler=lambda rnd, nodes: nodes, min_replies=2)
    sent = send(strategy, [1, 2, 3])
    good = {1: client(rng), 2: client(rng)}
    poisoned = client(rng)
    poisoned[B][0, 0] = np.nan
    arrays, metrics = strategy.aggregate_train(1, [
        answer(sent[1], good[1], examples=10), answer(sent[2], good[2], examples=30),
        answer(sent[3], poisoned)])
    expected = (10 * good[1][B].astype(np.float64) + 30 * good[2][B]) / 40
    np.testing.assert_allclose(to_arrays(arrays)[B], expected, rtol=1e-6)
    assert (metrics["replies"], metrics["failures"], metrics["lost"]) == (2, 1, 0)
    assert "NaN" in metrics.screened.failed[3]
    assert metrics["aggregation-error"] < 1e-12  # FFA: exact


@pytest.mark.parametrize("change, reason", [
    (lambda u, m: u.update(extra=np.zeros(2, np.float32)), "extra ['extra']"),
    (lambda u, m: u.clear() or u.update(other=np.zeros((6, 2), np.float32)),
     f"missing ['{B}']"),
    (lambda u, m: u.update({B: u[B].astype(np.float64)}), "dtype float64"),
    (lambda u, m: u.update({B: np.zeros((2, 6), np.float32)}), "shape (2, 6)"),
    (lambda u, m: u.update({B: np.full((6, 2), np.inf, np.float32)}), "NaN or Inf"),
    (lambda u, m: m.update({p.STEPS: None}), "['steps'] missing"),
    (lambda u, m: m.update({p.TRAIN_LOSS: float("nan")}), "not finite"),
    (lambda u, m: m.update({p.NUM_EXAMPLES: 0}), "not positive"),
    (lambda u, m: m.update(fingerprint="b" * 64), "different LoRA A"),
])
def test_each_invalid_reply_is_rejected_with_its_reason(rng, change, reason):
    strategy = ffa(node_sampler=lambda rnd, nodes: nodes, min_replies=1)
    sent = send(strategy, [1, 2])
    update, metrics = client(rng), {}
    change(update, metrics)
    ok = client(rng)
    arrays, screened = strategy.aggregate_train(1, [answer(sent[1], ok),
                                                    answer(sent[2], update, **metrics)])
    assert reason in screened.screened.failed[2]
    np.testing.assert_array_equal(to_arrays(arrays)[B], ok[B])


def test_an_error_from_the_superlink_is_attributed_by_message_id(rng):
    strategy = ffa(node_sampler=lambda rnd, nodes: nodes, min_replies=1)
    sent = send(strategy, [1, 2])
    unavailable = Message(Error(code=4, reason="node unavailable"), reply_to=sent[2])
    unavailable.metadata.__dict__["_src_node_id"] = 0  # sent by the SuperLink
    _, metrics = strategy.aggregate_train(1, [answer(sent[1], client(rng)), unavailable])
    assert metrics.screened.failed == {2: "error reply: node unavailable"}


def test_min_replies_decides_between_a_lost_round_and_an_aggregate(rng):
    update = client(rng)
    for min_replies, lost in ((None, True), (2, True), (1, False)):
        strategy = ffa(node_sampler=lambda rnd, nodes: nodes, min_replies=min_replies)
        sent = send(strategy, [1, 2])
        arrays, metrics = strategy.aggregate_train(1, [answer(sent[1], update)])
        assert (arrays is None, metrics["lost"]) == (lost, int(lost))
        assert metrics.screened.failed == {2: "no reply before the round timeout"}


def test_vanilla_accepts_any_a_and_ffa_needs_its_fingerprint(rng):
    vanilla = LoraFedAvg(node_sampler=lambda rnd, nodes: nodes, min_available_nodes=0)
    sent = send(vanilla, [1, 2])
    arrays, metrics = vanilla.aggregate_train(1, [
        answer(sent[1], client(rng), fingerprint="x"),
        answer(sent[2], client(rng), fingerprint="y")])
    assert arrays is not None and not metrics.screened.failed
    with pytest.raises(ValueError, match="for_model"):
        FfaFedAvg(a_fingerprint="", shared_arrays={})


def test_a_node_failing_again_and_again_is_no_longer_asked(rng):
    strategy = ffa(max_site_failures=2, min_replies=1,
                   node_sampler=lambda rnd, nodes: nodes)
    for rnd in (1, 2):
        sent = send(strategy, [1, 2], rnd)
        assert sorted(sent) == [1, 2]
        strategy.aggregate_train(rnd, [answer(sent[1], client(rng))])
    assert sorted(send(strategy, [1, 2], 3)) == [1]


def test_default_sampling_and_seeds():
    strategy = ffa(fraction_train=0.5, min_train_nodes=1)
    assert len(send(strategy, list(range(10)))) == 5
    shared = ConfigRecord({p.ROUND_SEED: 7})
    seeds = {per_node_seed(1, node, shared)[p.ROUND_SEED] for node in range(5)}
    assert len(seeds) == 5  # seeded clients never share noise
    assert per_node_seed(1, 3, shared)[p.ROUND_SEED] == per_node_seed(1, 3, shared)[
        p.ROUND_SEED] != per_node_seed(2, 3, shared)[p.ROUND_SEED]


def test_client_level_wrapper_noises_even_without_replies_and_divides_by_m(rng):
    z, clip, m = 1e-9, 100.0, 4  # noise negligible, nothing clipped: the fixed denominator
    inner = ffa(node_sampler=lambda rnd, nodes: nodes, min_replies=1)
    dp = ClientLevelDpFedAvg(inner, z, clip, m, lambda rnd: SeededRandom(rnd))
    global_arrays = {B: np.zeros((6, 2), np.float32)}
    messages = dp.configure_train(1, to_record(global_arrays), ConfigRecord(), NodesOnly([1, 2]))
    for message in messages:
        message.metadata.__dict__["_message_id"] = str(message.metadata.dst_node_id)
    update = client(rng)
    arrays, metrics = dp.aggregate_train(1, [answer(messages[0], update)])
    np.testing.assert_allclose(to_arrays(arrays)[B], update[B] / m, rtol=1e-5, atol=1e-6)
    assert metrics["update-clip-fraction"] == 0.0

    noisy = ClientLevelDpFedAvg(ffa(node_sampler=lambda rnd, nodes: []), 2.0, 0.5, m,
                                lambda rnd: SeededRandom(rnd))
    big = {B: np.zeros((300, 200), np.float32)}
    noisy.configure_train(1, to_record(big), ConfigRecord(), NodesOnly([1, 2]))
    alone, metrics = noisy.aggregate_train(1, [])  # nobody sampled: noise is released
    assert float(np.std(to_arrays(alone)[B])) == pytest.approx(2.0 * 0.5 / m, rel=0.02)
    assert metrics["lost"] == 0
