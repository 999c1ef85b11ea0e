"""Frozen-AB-R: A and B frozen at a seeded, identical init, only R (r x r) between them and
the head train and travel; averaging R is exact; the saved adapter is standard LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.local_grid import run_federation
from fed_dplora.config import parse_run_config
from fed_dplora.lora.adapters import (frozen_lora_factors, frozen_lora_fingerprint,
                                      trainable_arrays)
from fed_dplora.lora.model import ModelRecipe, build_lora_model, load_adapter
from fed_dplora.methods import method_for
from fed_dplora.methods.base import kind_of
from fed_dplora.run.results import read_metrics
from fed_dplora.site.trainer import LocalTrainer
from strategies import FfaFedAvg, to_arrays
from strategies.wire import payload_bytes
from test_aggregation import answer, flower_task  # noqa: F401 (fixture)
from test_model_factory import CPU, recipe
from test_rolora import exchange
from test_train import data, plan  # noqa: F401 (fixture)

FROZEN_AB_R = method_for("frozen-ab-r")


def model(tiny_bert, seed=0):
    return build_lora_model(recipe(tiny_bert, "frozen-ab-r", seed), CPU)


def test_only_r_and_the_head_train_and_the_frozen_factors_are_the_seeds(tiny_bert):
    first, again, other = model(tiny_bert), model(tiny_bert), model(tiny_bert, seed=1)
    kinds = {kind_of(n) for n in trainable_arrays(first)}
    assert kinds == {"R", "head"}
    r = [a for n, a in trainable_arrays(first).items() if kind_of(n) == "R"]
    assert r and all(a.shape == (4, 4) and not a.any() for a in r)  # rank 4, zero
    frozen = frozen_lora_factors(first)
    assert {kind_of(n) for n in frozen} == {"A", "B"} and all(a.any() for a in frozen.values())
    assert frozen_lora_fingerprint(first) == frozen_lora_fingerprint(again)
    assert frozen_lora_fingerprint(first) != frozen_lora_fingerprint(other)


def test_a_site_round_moves_r_and_the_head_and_never_a_or_b(tiny_bert, data):
    """Under DP-SGD: the accumulator refuses a trained tensor without per-sample
    gradients; the guard checks that exactly R and the head moved."""
    trainer = LocalTrainer(recipe(tiny_bert, "frozen-ab-r"), CPU, private=True)
    frozen = frozen_lora_factors(trainer.model)
    sent = trainable_arrays(trainer.model)
    out, report = trainer.train(sent, plan(), data)
    assert set(out) == set(sent) and report.noise_multiplier == 0.8
    assert all(not np.array_equal(out[n], sent[n]) for n in out)
    after = frozen_lora_factors(trainer.model)
    assert all(np.array_equal(after[n], frozen[n]) for n in frozen)
    assert trainer.verified == {frozenset(sent)}


def test_the_server_averages_r_exactly_and_refuses_other_frozen_factors(tiny_bert):
    """Hand computation: the released R is the weighted mean of the replies' R, and
    B mean(R_i) A = mean(B R_i A) (aggregation error 0); a site whose frozen A or B
    differ (another seed) is rejected by their fingerprint."""
    built = model(tiny_bert)
    strategy = FfaFedAvg.for_model(built, method=FROZEN_AB_R, min_available_nodes=0,
                                   node_sampler=lambda rnd, nodes: nodes, sizes={1: 30, 2: 10})
    sent = trainable_arrays(built)
    rng = np.random.default_rng(5)
    updates = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in sent.items()}
               for _ in range(2)]
    arrays, metrics = exchange(strategy, 1, sent, [(u, n) for u, n in zip(updates, (30, 10))],
                               fingerprint=strategy.a_fingerprint)
    released = to_arrays(arrays)
    for k in sent:
        np.testing.assert_allclose(released[k], 0.75 * updates[0][k] + 0.25 * updates[1][k],
                                   rtol=1e-5, atol=1e-7)
    assert metrics["aggregation-error"] < 1e-12 and metrics["replies"] == 2
    name = next(n for n in sent if kind_of(n) == "R")
    a_name = name.replace(".lora_R", "")
    a, b = (strategy.shared_arrays[n].astype(np.float64)
            for n in (a_name, a_name.replace(".lora_A.", ".lora_B.")))
    delta = [b @ r.astype(np.float64) @ a for r in (released[name], updates[0][name],
                                                     updates[1][name])]
    np.testing.assert_allclose(delta[0], 0.75 * delta[1] + 0.25 * delta[2], rtol=1e-5,
                               atol=1e-7)

    foreign = frozen_lora_fingerprint(model(tiny_bert, seed=1))
    _, refused = exchange(strategy, 2, sent, [(updates[0], 30), (updates[1], 10)],
                          fingerprint=[strategy.a_fingerprint, foreign])
    assert refused["replies"] == 1


def test_the_saved_adapter_is_standard_lora_with_the_same_outputs(tiny_bert, tmp_path):
    built = model(tiny_bert)
    with torch.no_grad():
        for name, param in built.named_parameters():
            if kind_of(name) == "R":
                param.normal_(0, 0.5)
    built.eval()
    folded = FROZEN_AB_R.exportable(built)
    folded.save_pretrained(str(tmp_path / "adapter"))
    loaded = load_adapter(recipe(tiny_bert, "frozen-ab-r"), tmp_path / "adapter", CPU)
    assert not any(kind_of(n) == "R" for n, _ in loaded.named_parameters())
    ids = torch.randint(5, 30, (3, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = built(ids, mask)
        base = model(tiny_bert).eval()(ids, mask)  # R = 0: the LoRA path adds nothing
        assert not torch.allclose(expected, base, atol=1e-4)
        torch.testing.assert_close(loaded(ids, mask), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("level", ["sample", "both"])
def test_a_frozen_ab_r_federation_is_exact_and_sends_only_r_and_the_head(config, level):
    run = {**config, "method": "frozen-ab-r", "num-server-rounds": 2, "privacy.level": level}
    run_federation(run, 2)
    rows = read_metrics(f"{run['output-dir']}/{run['run-name']}")
    assert [r["round"] for r in rows] == [1, 2]
    arrays = trainable_arrays(build_lora_model(
        ModelRecipe.from_spec(parse_run_config(run), 3), CPU))
    assert {kind_of(n) for n in arrays} == {"R", "head"}
    for row in rows:
        assert row["replies"] == 2 and not row["lost"]
        assert row["aggregation_error"] < 1e-6
        assert row["bytes_up"] == 2 * payload_bytes(arrays)
        assert row["bytes_down"] == 4 * payload_bytes(arrays)

