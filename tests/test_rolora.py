"""RoLoRA: A and B both global, trained in alternate rounds (B first), each average
exact; what trains is what comes back, and nothing held moves."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

from experiments.local_grid import run_federation
from fed_dplora.aggregation import aggregation_error
from fed_dplora.dp.noise import SeededRandom
from fed_dplora.config import parse_run_config
from fed_dplora.lora.adapters import trainable_arrays
from fed_dplora.lora.model import ModelRecipe, build_lora_model
from fed_dplora.methods import method_for
from fed_dplora.methods.base import LoraMethod, kind_of
from fed_dplora.run.results import read_metrics
from fed_dplora.site.trainer import LocalTrainer
from strategies import ClientLevelDpFedAvg, LoraFedAvg, to_arrays, to_record
from strategies.wire import payload_bytes
from helpers import NodesOnly
from test_aggregation import FINGERPRINT, answer, flower_task  # noqa: F401 (fixture)
from test_model_factory import CPU, recipe
from test_train import data, plan  # noqa: F401 (fixture)

ROLORA = method_for("rolora")
A, B, HEAD = "m.lora_A.default.weight", "m.lora_B.default.weight", "classifier.weight"


def test_b_trains_in_odd_rounds_a_in_even_ones_and_the_head_in_every_round():
    names = [A, B, HEAD]
    assert [kind_of(n) for n in names] == ["A", "B", "head"]
    assert [ROLORA.trained(names, rnd) for rnd in (1, 2, 3, 4)] == [
        {B, HEAD}, {A, HEAD}, {B, HEAD}, {A, HEAD}]
    assert method_for("vanilla").trained(names, 2) == set(names)
    with pytest.raises(ValueError, match=r"names kinds \['C'\]"):
        LoraMethod("typo", True, False, alternation=(frozenset({"C"}),))


def test_a_site_trains_then_returns_only_the_rounds_part_and_holds_the_rest(tiny_bert,
                                                                              data):
    """Under DP-SGD (Opacus hooks attached again for each part): round 1 moves B and
    the head and returns them, A is bit-identical to what was sent; round 2 the reverse.
    The accumulator refuses a trained tensor without per-sample gradients, and the
    moved/frozen guard has run once per part."""
    trainer = LocalTrainer(recipe(tiny_bert, "rolora"), CPU, private=True)
    sent = trainable_arrays(trainer.model)
    a_names = {n for n in sent if kind_of(n) == "A"}
    b_names = {n for n in sent if kind_of(n) == "B"}
    heads = set(sent) - a_names - b_names
    assert a_names and b_names and heads
    sent = {n: v + (0.05 if n in b_names else 0.0) for n, v in sent.items()}  # B != 0
    for rnd, trains, held in ((1, b_names, a_names), (2, a_names, b_names)):
        out, report = trainer.train(sent, plan_for(rnd), data)
        assert set(out) == trains | heads and report.noise_multiplier == 0.8
        assert all(not np.array_equal(out[n], sent[n]) for n in out)
        model = dict(trainer.model.named_parameters())
        assert all(np.array_equal(model[n].detach().numpy(), sent[n]) for n in held)
        sent = {**sent, **out}
    assert trainer.verified == {frozenset(b_names | heads), frozenset(a_names | heads)}


def plan_for(rnd: int):
    import dataclasses
    return dataclasses.replace(plan(), server_round=rnd)


def rolora_strategy(**kwargs) -> LoraFedAvg:
    return LoraFedAvg(method=ROLORA, min_available_nodes=0,
                      node_sampler=lambda rnd, nodes: nodes, **kwargs)


def global_tensors(rng) -> dict[str, np.ndarray]:
    return {A: rng.normal(size=(2, 5)).astype(np.float32),
            B: rng.normal(size=(6, 2)).astype(np.float32),
            HEAD: rng.normal(size=(3, 4)).astype(np.float32)}


def exchange(strategy, rnd, sent, replies, fingerprint=FINGERPRINT):
    """A round: configure, answer each node with its update (and `fingerprint`, or
    one per node), aggregate."""
    prints = fingerprint if isinstance(fingerprint, list) else [fingerprint] * len(replies)
    messages = strategy.configure_train(rnd, to_record(sent), ConfigRecord({}),
                                        NodesOnly(list(range(1, len(replies) + 1))))
    for message in messages:
        message.metadata.__dict__["_message_id"] = f"r{rnd}-n{message.metadata.dst_node_id}"
    assert all(set(to_arrays(m.content["arrays"])) == set(sent) for m in messages)  # down
    arrays, metrics = strategy.aggregate_train(rnd, [
        answer(m, u, examples=n, fingerprint=f)
        for m, (u, n), f in zip(messages, replies, prints)])
    return arrays, metrics


def test_the_server_averages_the_rounds_part_exactly_and_holds_the_rest():
    """Hand computation: round 1 releases the weighted mean of B and the head with A as
    sent; its aggregation error is 0, where vanilla's (A trained too, so differing by
    site) is not. Round 2 mirrors it. A reply that returns a held tensor is invalid."""
    rng = np.random.default_rng(3)
    sent = global_tensors(rng)
    for rnd, part in ((1, (B, HEAD)), (2, (A, HEAD))):
        updates = [{k: rng.normal(size=sent[k].shape).astype(np.float32) for k in part}
                   for _ in range(2)]
        strategy = rolora_strategy(sizes={1: 30, 2: 10})
        arrays, metrics = exchange(strategy, rnd, sent, [(u, n) for u, n in
                                                         zip(updates, (30, 10))])
        released = to_arrays(arrays)
        for k in part:
            np.testing.assert_allclose(released[k], 0.75 * updates[0][k]
                                       + 0.25 * updates[1][k], rtol=1e-6)
        held = set(sent) - set(part)
        assert all(np.array_equal(released[k], sent[k]) for k in held)
        assert metrics["aggregation-error"] < 1e-12 and metrics["replies"] == 2
        other = A if rnd == 1 else B  # had it trained too, by site (vanilla): inexact
        both = [{**sent, **u, other: rng.normal(size=sent[other].shape)} for u in updates]
        assert aggregation_error(both, [3, 1], {}) > 0.01

        extra = {**updates[0], **{k: sent[k] for k in held}}
        _, refused = exchange(rolora_strategy(), rnd, sent, [(extra, 30), (updates[1], 10)])
        assert refused["replies"] == 1 and f"round trains: missing [], extra ['{other}']" in str(
            refused.screened.failed)


def test_client_level_dp_noises_and_clips_only_what_the_round_trains():
    """DP-FedAvg over RoLoRA: the held A leaves the server bit-identical (no noise on
    it, so its sensitivity is not spent on it); B gets sum(updates)/m plus the noise."""
    rng = np.random.default_rng(4)
    sent = global_tensors(rng)
    m = 4
    dp = ClientLevelDpFedAvg(rolora_strategy(), 1e-9, 100.0, m, lambda rnd: SeededRandom(rnd))
    update = {k: sent[k] + rng.normal(size=sent[k].shape).astype(np.float32)
              for k in (B, HEAD)}
    arrays, _ = exchange(dp, 1, sent, [(update, 10)])
    released = to_arrays(arrays)
    assert np.array_equal(released[A], sent[A])
    np.testing.assert_allclose(released[B], sent[B] + (update[B] - sent[B]) / m,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("level", ["sample", "both"])
def test_a_rolora_federation_is_exact_and_sends_back_half_of_what_it_sends(config, level):
    """Three rounds in process under DP: every round exact (aggregation error 0 up to
    float rounding), each reply carries the round's part only."""
    run = {**config, "method": "rolora", "num-server-rounds": 3, "privacy.level": level}
    run_federation(run, 2)
    rows = read_metrics(f"{run['output-dir']}/{run['run-name']}")
    assert [r["round"] for r in rows] == [1, 2, 3]
    arrays = trainable_arrays(build_lora_model(
        ModelRecipe.from_spec(parse_run_config(run), 3), CPU))
    part = {rnd: {n: a for n, a in arrays.items() if n in ROLORA.trained(arrays, rnd)}
            for rnd in (1, 2, 3)}
    for row in rows:
        assert row["replies"] == 2 and not row["lost"]
        assert row["aggregation_error"] < 1e-6
        assert row["bytes_up"] == 2 * payload_bytes(part[row["round"]])
        # every global tensor goes down, to the 2 that train and the 2 that evaluate
        assert row["bytes_down"] == 4 * payload_bytes(arrays)
