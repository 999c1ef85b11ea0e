"""task="causal-lm" on tiny random GPT-2 (Conv1D) and Llama models, built offline.

Exactness of the per-sample clipped gradient (the per-record loss is the mean over that
record's real tokens, padding masked by the attention mask), what one DP step moves, an
empty Poisson batch, token-weighted evaluation, the architecture defaults, and the
text-only data path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_model_factory import CPU, with_nonzero_b

from fed_dplora.config import ConfigError, LoraSpec, ModelSpec, parse_run_config
from fed_dplora.data.demo import generate_site
from fed_dplora.data.sources import LabelledText, load_local
from fed_dplora.data.tokenize import tokenize
from fed_dplora.dp.engine import (
    DpSgdAccumulator,
    DpSgdConfig,
    PoissonSampling,
    wrap_for_per_sample_grads,
)
from fed_dplora.dp.noise import SeededRandom
from fed_dplora.lora.model import ModelRecipe, build_lora_model, load_tokenizer
from fed_dplora.run.results import read_base_score, read_metrics
from fed_dplora.tasks import task_for
from fed_dplora.tasks.causal_lm import CausalLanguageModel, greedy_continuations
from fed_dplora.site.trainer import LocalTrainer, RoundPlan, evaluate_model

LM = task_for("causal-lm")
# Token ids of six records of different lengths (one of a single token: no target).
RECORDS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15, 16, 17, 18, 19, 20], [21], [22, 23, 4]]


def lm_recipe(path: str, method: str, targets: tuple[str, ...] = ()) -> ModelRecipe:
    return ModelRecipe(ModelSpec(name=path, max_length=32),
                       LoraSpec(rank=4, alpha=8, target_modules=targets), method, 0, 0,
                       "causal-lm")


def padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def model_with_nonzero_b(path: str, method: str):
    return with_nonzero_b(build_lora_model(lm_recipe(path, method), CPU))


def record_loss(model, row: list[int]) -> torch.Tensor:
    """One record alone, unpadded: mean next-token cross-entropy over its tokens."""
    ids = torch.tensor([row])
    logits = model(ids, torch.ones_like(ids))
    if len(row) < 2:
        return logits.sum() * 0.0
    return F.cross_entropy(logits[0, :-1], ids[0, 1:])


def hand_clipped_mean(model, clip: float) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for row in RECORDS:
        grads = torch.autograd.grad(record_loss(model, row), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        for t, g in zip(total, grads):
            t += g * factor
    return [t / len(RECORDS) for t in total]


def engine_gradient(model, clip: float, functorch: bool, physical: int = 4):
    gsm = wrap_for_per_sample_grads(model, CPU, functorch)
    acc = DpSgdAccumulator(gsm, DpSgdConfig(0.0, clip, len(RECORDS)), SeededRandom(0))
    acc.begin()
    for lo in range(0, len(RECORDS), physical):  # two padded physical batches
        ids, mask = padded(RECORDS[lo:lo + physical], pad=3)
        LM.loss_sum(gsm(ids, mask), ids, mask, None).backward()
        acc.add_physical_batch(ids.shape[0])
    acc.finish()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["ffa", "vanilla"])
@pytest.mark.parametrize("clip", [1e6, 1e-3], ids=["no-clipping", "all-clipped"])
@pytest.mark.parametrize("functorch", [False, True], ids=["hooks", "functorch"])
def test_noise_free_gradient_equals_clipped_per_record_mean(request, arch, method, clip,
                                                             functorch):
    model = model_with_nonzero_b(request.getfixturevalue(f"tiny_{arch}_lm"), method)
    expected = hand_clipped_mean(model, clip)
    got = engine_gradient(model, clip, functorch)
    scale = max(float(e.abs().max()) for e in expected)
    assert scale > 0
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * scale)


def test_padding_never_changes_a_records_loss(tiny_gpt2_lm):
    model = build_lora_model(lm_recipe(tiny_gpt2_lm, "ffa"), CPU).eval()
    ids, mask = padded(RECORDS, pad=7)
    with torch.no_grad():
        batched = LM.loss_sum(model(ids, mask), ids, mask, None)
        alone = sum(record_loss(model, row) for row in RECORDS)
    assert float(batched) == pytest.approx(float(alone), rel=1e-5)


@pytest.fixture()
def corpus(tiny_gpt2_lm):
    texts, _ = generate_site(0, 80, 0)
    tokenizer = load_tokenizer(ModelSpec(name=tiny_gpt2_lm))
    return tokenize(LabelledText(tuple(texts), ("",) * len(texts)), tokenizer, 24, None)


def plan(noise: float | None, steps: int = 2) -> RoundPlan:
    return RoundPlan(local_steps=steps, batch_size=16, physical_batch_size=8,
                     learning_rate=0.5, optimizer="sgd", noise_multiplier=noise,
                     max_grad_norm=1.0, seed=3)


def parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["ffa", "vanilla"])
def test_one_noise_free_dp_step_moves_exactly_the_trainable_tensors(request, arch, method,
                                                                    corpus):
    """Noise 0: whatever moves was moved by the clipped signal, not by noise. Two steps:
    B starts at 0, so vanilla's A has no gradient before B has moved."""
    trainer = LocalTrainer(lm_recipe(request.getfixturevalue(f"tiny_{arch}_lm"), method),
                           CPU, private=True)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_B." in n or (method == "vanilla" and ".lora_A." in n)
                             for n in trainable)
    before = parameters(trainer.model)
    start = {n: before[n].numpy() for n in trainable}
    trainer.train(start, plan(noise=0.0, steps=2), corpus)
    after = parameters(trainer.model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == trainable


def test_empty_poisson_batches_are_noised_without_a_forward_pass(tiny_gpt2_lm, corpus,
                                                                monkeypatch):
    trainer = LocalTrainer(lm_recipe(tiny_gpt2_lm, "ffa"), CPU, private=True)
    forwards = []
    trainer.forward_module.register_forward_hook(lambda *_: forwards.append(1))
    monkeypatch.setattr(PoissonSampling, "draw", lambda self: [])
    start = {n: p.detach().numpy().copy() for n, p in trainer.model.named_parameters()
             if p.requires_grad}
    out, report = trainer.train(start, plan(noise=1.0, steps=3), corpus)
    assert forwards == [] and report.steps == 3 and report.noise_multiplier == 1.0
    assert all(not np.array_equal(out[n], start[n]) for n in start)  # noise, every step
    assert report.train_loss == 0.0


def test_evaluation_is_token_weighted_next_token_loss_and_accuracy(tiny_llama_lm):
    model = build_lora_model(lm_recipe(tiny_llama_lm, "ffa"), CPU)
    tokenizer = load_tokenizer(ModelSpec(name=tiny_llama_lm))
    texts = ("the patient was seen", "pain", "chest pain since this morning , no fever")
    data = tokenize(LabelledText(texts, ("",) * 3), tokenizer, 24, None)
    report = evaluate_model(model, LM, data, 2, CPU)
    losses, hits, tokens = [], 0, 0
    with torch.no_grad():
        for row in data.input_ids:
            logits = model(row[None], torch.ones_like(row[None]))[0, :-1]
            losses += F.cross_entropy(logits, row[1:], reduction="none").tolist()
            hits += int((logits.argmax(-1) == row[1:]).sum())
            tokens += len(row) - 1
    assert report.weight == tokens == len(losses) and report.num_examples == 3
    assert report.loss == pytest.approx(sum(losses) / tokens, rel=1e-5)
    assert report.accuracy == pytest.approx(hits / tokens)


def test_architecture_defaults_for_lora_targets(tiny_gpt2_lm, tiny_llama_lm, tiny_bert):
    gpt2 = build_lora_model(lm_recipe(tiny_gpt2_lm, "ffa"), CPU)
    assert {n.split(".")[-4] for n, _ in gpt2.named_parameters() if ".lora_B." in n} == {
        "c_attn"}
    assert gpt2.peft_config["default"].fan_in_fan_out  # Conv1D stores weights transposed
    llama = build_lora_model(lm_recipe(tiny_llama_lm, "ffa"), CPU)
    assert {n.split(".")[-4] for n, _ in llama.named_parameters() if ".lora_B." in n} == {
        "q_proj", "v_proj"}
    bert = build_lora_model(ModelRecipe(ModelSpec(name=tiny_bert), LoraSpec(), "ffa", 2, 0),
                            CPU)
    assert {n.split(".")[-4] for n, _ in bert.named_parameters() if ".lora_B." in n} == {
        "query", "value"}
    override = build_lora_model(lm_recipe(tiny_llama_lm, "ffa", ("o_proj",)), CPU)
    assert {n.split(".")[-4] for n, _ in override.named_parameters()
            if ".lora_B." in n} == {"o_proj"}


def test_greedy_continuations_are_deterministic_and_restore_train_mode(tiny_gpt2_lm):
    model = build_lora_model(lm_recipe(tiny_gpt2_lm, "ffa"), CPU)
    tokenizer = load_tokenizer(ModelSpec(name=tiny_gpt2_lm))
    prompts = ("the patient", "chest pain")
    first = greedy_continuations(model, tokenizer, prompts, 5)
    assert first == greedy_continuations(model, tokenizer, prompts, 5)
    # At most 5 new words each (a random model may emit its end token early).
    assert len(first) == 2 and all(len(text.split()) <= 5 for text in first)
    assert any(first)
    assert all(m.training for m in model.modules() if isinstance(m, CausalLanguageModel))


def test_text_only_data_needs_no_label_column(tmp_path):
    two = tmp_path / "two.tsv"
    two.write_text("first text\tSports\nsecond text\tWorld\n" * 5)
    one = tmp_path / "one.tsv"
    one.write_text("first text\nsecond text\n" * 5)
    for path in (two, one):
        splits = load_local(path, "text", "", seed=0)
        assert len(splits.train) + len(splits.test) == 10
        assert set(splits.train.labels) == {""}
        assert set(splits.train.texts) <= {"first text", "second text"}


def test_causal_lm_config_is_validated():
    spec = parse_run_config({"task": "causal-lm", "generation.prompts": "a|b c",
                             "lora.target-modules": "auto"})
    assert spec.task == "causal-lm" and spec.generation.prompts == ("a", "b c")
    assert spec.lora.target_modules == ()
    with pytest.raises(ConfigError, match="valid values are"):
        parse_run_config({"task": "translation"})
    with pytest.raises(ConfigError, match="splits by label"):
        parse_run_config({"task": "causal-lm", "data.path": "x.tsv",
                          "data.partitioner": "dirichlet"})
    with pytest.raises(ConfigError, match="generation.prompts"):
        parse_run_config({"generation.prompts": "a||b"})


def test_an_encoder_is_refused_for_causal_lm_naming_the_model(tiny_bert, tiny_gpt2):
    """BERT (and a GPT-2 body without its LM head) would load as a causal LM and train
    into nonsense; the error names model.name and what would fit."""
    from fed_dplora.lora.model import ModelError
    for encoder in (tiny_bert, tiny_gpt2):
        recipe = ModelRecipe(ModelSpec(encoder), LoraSpec(), "ffa", 0, 0, "causal-lm")
        with pytest.raises(ModelError, match=r"model.name=.*not a causal language model.*"
                                             r"SmolLM2-135M-Instruct"):
            build_lora_model(recipe, CPU)


def test_a_tokenizer_with_nothing_to_pad_with_is_refused(tiny_gpt2_lm, tmp_path):
    from transformers import AutoTokenizer

    from fed_dplora.lora.model import ModelError
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_lm)
    tokenizer.eos_token = None
    folder = tmp_path / "no-pad"
    tokenizer.save_pretrained(folder)
    with pytest.raises(ModelError, match="neither a pad nor an end-of-text token"):
        load_tokenizer(ModelSpec(str(folder)))


def test_perplexity_is_exp_of_the_token_weighted_loss():
    from server.lm_outputs import LmOutputs
    assert LmOutputs.row_fields(math.log(20.0))["eval_perplexity"] == pytest.approx(20.0)
    assert LmOutputs.row_fields(None) == {"eval_perplexity": None}


def test_a_causal_lm_federation_writes_perplexity_and_samples(tiny_llama_lm, config):
    """The project's ServerApp and ClientApp on the in-process grid, 2 sites, 2 rounds."""
    from experiments.local_grid import LocalGrid, run_server_app
    from server.server_app import app

    run_config = {**config, "task": "causal-lm", "model.name": tiny_llama_lm,
                  "num-server-rounds": 2, "generation.max-new-tokens": 4,
                  "generation.prompts": "the patient|chest pain"}
    run_server_app(app, run_config, LocalGrid(run_config, 2))
    run_dir = Path(config["output-dir"]) / "run"
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    base = read_base_score(run_dir)  # round 0: the base LM's perplexity, before training
    assert base["eval_perplexity"] == pytest.approx(math.exp(base["eval_loss"]))
    assert base["eval_loss"] != rows[0]["eval_loss"] and base["epsilon_sample"] == 0.0
    for row in rows:
        assert row["eval_perplexity"] == pytest.approx(math.exp(row["eval_loss"]))
        assert 0 <= row["eval_accuracy"] <= 1 and row["epsilon_sample"] > 0
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(s["round"], s["prompt"]) for s in samples] == [
        (r, p) for r in (0, 1, 2) for p in ("the patient", "chest pain")]
    assert json.loads((run_dir / "config.json").read_text())["label_names"] == []


def test_a_resumed_causal_lm_run_writes_each_rounds_samples_once(tiny_llama_lm, config,
                                                                  monkeypatch):
    """A crash after round 2's samples and before its commit: the resumed run drops
    those samples and writes round 2's again, once."""
    from experiments.local_grid import LocalGrid, run_server_app
    from server.federation import Federation
    from server.server_app import app

    run_config = {**config, "task": "causal-lm", "model.name": tiny_llama_lm,
                  "num-server-rounds": 2, "generation.max-new-tokens": 2,
                  "generation.prompts": "the patient"}
    commit = Federation._commit

    def crash_in_round_2(self, rnd, row):
        if rnd == 2:
            raise RuntimeError("crash before round 2 commits")
        commit(self, rnd, row)
    monkeypatch.setattr(Federation, "_commit", crash_in_round_2)
    with pytest.raises(RuntimeError, match="crash before round 2"):
        run_server_app(app, run_config, LocalGrid(run_config, 2))
    run_dir = Path(config["output-dir"]) / "run"
    rounds = [json.loads(line)["round"]
              for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]  # the crash left round 2's samples behind
    monkeypatch.setattr(Federation, "_commit", commit)
    resumed = {**run_config, "resume": True}
    run_server_app(app, resumed, LocalGrid(resumed, 2))
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["round"] for s in samples] == [0, 1, 2]
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2]
