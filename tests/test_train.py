"""Local training end to end on a tiny model: what moves, what must not, fail-closed."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

import fed_dplora.site.trainer as train_module
from fed_dplora.data.demo import LABELS, generate_site
from fed_dplora.data.sources import LabelledText
from fed_dplora.data.tokenize import tokenize
from fed_dplora.dp.guards import GuardError
from fed_dplora.lora.adapters import trainable_arrays
from fed_dplora.lora.model import load_tokenizer
from fed_dplora.site.trainer import LocalTrainer, RoundPlan
from test_model_factory import CPU, recipe


@pytest.fixture()
def data(tiny_bert):
    texts, labels = generate_site(0, 120, 0)
    tokenizer = load_tokenizer(recipe(tiny_bert, "ffa").model)
    return tokenize(LabelledText(tuple(texts), tuple(labels)), tokenizer, 32, LABELS)


def plan(noise=0.8, steps=3):
    return RoundPlan(local_steps=steps, batch_size=32, physical_batch_size=16,
                     learning_rate=0.5, optimizer="sgd", noise_multiplier=noise,
                     max_grad_norm=1.0, seed=7)


def test_ffa_round_moves_b_and_head_and_never_a(tiny_bert, data):
    trainer = LocalTrainer(recipe(tiny_bert, "ffa"), CPU, private=True)
    a_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                if ".lora_A." in n}
    start = trainable_arrays(trainer.model)
    out, report = trainer.train(start, plan(), data)
    assert set(out) == set(start)
    assert all(not np.array_equal(out[n], start[n]) for n in out)
    assert all(torch.equal(p, a_before[n]) for n, p in trainer.model.named_parameters()
               if n in a_before)
    assert report.sampling_probability == pytest.approx(32 / 120)
    assert report.noise_multiplier == 0.8 and report.steps == 3
    assert 0.0 <= report.clip_fraction <= 1.0 and report.train_loss > 0


def test_rounds_are_reproducible_from_the_round_seed(tiny_bert, data):
    trainer = LocalTrainer(recipe(tiny_bert, "vanilla"), CPU, private=True)
    start = trainable_arrays(trainer.model)
    first, _ = trainer.train(start, plan(), data)
    second, _ = trainer.train(start, plan(), data)
    assert all(np.array_equal(first[n], second[n]) for n in first)


def test_dp_round_does_not_depend_on_how_the_logical_batch_is_split(tiny_bert, data):
    # Physical batches are padded (and sorted by length); one record at a time is not.
    trainer = LocalTrainer(recipe(tiny_bert, "vanilla"), CPU, private=True)
    start = trainable_arrays(trainer.model)
    outs = [trainer.train(start, dataclasses.replace(plan(), physical_batch_size=size), data)[0]
            for size in (1, 16, 64)]
    assert len({len(row) for row in data.input_ids}) > 5  # lengths really vary
    for other in outs[1:]:
        for name in outs[0]:
            np.testing.assert_allclose(other[name], outs[0][name], rtol=1e-4, atol=1e-6)
    one = trainer.evaluate(start, data, batch_size=1)
    batched = trainer.evaluate(start, data, batch_size=50)
    assert batched.accuracy == one.accuracy
    assert batched.loss == pytest.approx(one.loss, rel=1e-5)


def test_stale_optimizer_in_the_training_loop_is_refused(tiny_bert, data, monkeypatch):
    trainer = LocalTrainer(recipe(tiny_bert, "ffa"), CPU, private=True)
    real = train_module.make_optimizer
    monkeypatch.setattr(train_module, "make_optimizer",
                        lambda model, name, lr: real(copy.deepcopy(model), name, lr))
    with pytest.raises(GuardError, match="stale copies"):
        trainer.train(trainable_arrays(trainer.model), plan(), data)


def test_stale_optimizer_is_refused_in_later_rounds_too(tiny_bert, data, monkeypatch):
    """The weight-moved check runs once per trainer; the optimizer check every round."""
    trainer = LocalTrainer(recipe(tiny_bert, "ffa"), CPU, private=True)
    trainer.train(trainable_arrays(trainer.model), plan(), data)
    assert trainer.verified == {trainer.global_names}
    real = train_module.make_optimizer
    monkeypatch.setattr(train_module, "make_optimizer",
                        lambda model, name, lr: real(copy.deepcopy(model), name, lr))
    with pytest.raises(GuardError, match="stale copies"):
        trainer.train(trainable_arrays(trainer.model), plan(), data)


def test_dp_client_refuses_a_plan_without_noise_and_vice_versa(tiny_bert, data):
    private = LocalTrainer(recipe(tiny_bert, "ffa"), CPU, private=True)
    with pytest.raises(ValueError, match="without noise"):
        private.train(trainable_arrays(private.model), plan(noise=None), data)
    plain = LocalTrainer(recipe(tiny_bert, "ffa"), CPU, private=False)
    with pytest.raises(ValueError, match="asks for DP"):
        plain.train(trainable_arrays(plain.model), plan(noise=1.0), data)
    out, report = plain.train(trainable_arrays(plain.model), plan(noise=None), data)
    assert report.noise_multiplier == 0.0 and report.clip_fraction == 0.0


def test_evaluate_reports_loss_and_accuracy_over_all_records(tiny_bert, data):
    trainer = LocalTrainer(recipe(tiny_bert, "ffa"), CPU, private=True)
    report = trainer.evaluate(trainable_arrays(trainer.model), data, batch_size=50)
    assert report.num_examples == 120 and 0.0 <= report.accuracy <= 1.0
    assert report.loss == pytest.approx(np.log(3), rel=0.3)
    assert trainer.model.training  # back in train mode for the next round


def test_bf16_autocast_is_used_on_cuda_only():
    from contextlib import nullcontext

    from fed_dplora.site.trainer import mixed_precision
    assert isinstance(mixed_precision(torch.device("cpu")), nullcontext)
    cuda = mixed_precision(torch.device("cuda"))
    assert isinstance(cuda, torch.autocast)
    assert cuda.device == "cuda" and cuda.fast_dtype == torch.bfloat16
