"""Tiny random-init models, saved as model folders with in-process tokenizers (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import (GPT2Config, GPT2LMHeadModel, GPT2Model, LlamaConfig,
                          LlamaForCausalLM)

from experiments.flwr_job import app_defaults
from experiments.tiny_models import demo_vocab, save_tiny_bert, word_tokenizer
from flwr_cli import flwr_environment, stop_local_superlink

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
DEFAULTS = app_defaults()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT with dropout off, as a local model folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _tiny_gpt2_config(vocab: dict[str, int]) -> GPT2Config:
    return GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2,
                      n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _model_folder(tmp_path_factory, name: str, model, bert_tokenizer: bool) -> str:
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    word_tokenizer(demo_vocab(), bert=bert_tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random GPT-2 with dropout off, as a local model folder."""
    return _model_folder(tmp_path_factory, "tiny-gpt2",
                         GPT2Model(_tiny_gpt2_config(demo_vocab())), bert_tokenizer=False)


@pytest.fixture(scope="session")
def tiny_gpt2_lm(tmp_path_factory) -> str:
    """The same GPT-2 as a language model (Conv1D layers, tied LM head)."""
    return _model_folder(tmp_path_factory, "tiny-gpt2-lm",
                         GPT2LMHeadModel(_tiny_gpt2_config(demo_vocab())), bert_tokenizer=False)


@pytest.fixture(scope="session")
def tiny_llama_lm(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random Llama language model (q_proj/v_proj, RoPE, RMSNorm)."""
    config = LlamaConfig(vocab_size=len(demo_vocab()), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=0)
    return _model_folder(tmp_path_factory, "tiny-llama-lm", LlamaForCausalLM(config),
                         bert_tokenizer=True)


@pytest.fixture(autouse=True)
def private_flwr_home(tmp_path, monkeypatch):
    """Nothing a test runs writes under the real FLWR_HOME (a deployed client's default
    site ledger lives there)."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


@pytest.fixture()
def flwr_env(tmp_path):
    """The environment of a user's `flwr` commands, in a private FLWR_HOME on free ports;
    the local SuperLink they start is stopped afterwards."""
    home = tmp_path / "flwr-home"
    yield flwr_environment(home)
    stop_local_superlink(home)


@pytest.fixture()
def config(tiny_bert, tmp_path) -> dict:
    """The default run config, shrunk to a few seconds a round on the tiny BERT."""
    return {**DEFAULTS, "model.name": tiny_bert, "output-dir": str(tmp_path / "runs"),
            "run-name": "run", "num-server-rounds": 3, "clients-per-round": 2,
            "local-steps": 2, "batch-size": 32, "physical-batch-size": 16,
            "data.demo-records-per-site": 150, "learning-rate": 0.5,
            "privacy.secure-noise": False}
