"""Tiny random-init models, saved as model folders with in-process tokenizers (offline)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model,
                          LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast)

from fed_dplora.data.demo import generate_site
from flwr_cli import flwr_environment, stop_local_superlink

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
DEFAULTS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def _vocab() -> dict[str, int]:
    words = set()
    for site in range(3):
        for text in generate_site(site, 300, 0)[0]:
            words.update(re.findall(r"\w+|[^\w\s]", text))
    return {w: i for i, w in enumerate(SPECIALS + sorted(words))}


def _tokenizer(vocab: dict[str, int], bert: bool) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    if bert:
        return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]",
                                       unk_token="[UNK]", cls_token="[CLS]",
                                       sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                   eos_token="[SEP]")  # GPT-2 style: no pad token


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT with dropout off, as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = _vocab()
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    _tokenizer(vocab, bert=True).save_pretrained(folder)
    return str(folder)


def _tiny_gpt2_config(vocab: dict[str, int]) -> GPT2Config:
    return GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2,
                      n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _model_folder(tmp_path_factory, name: str, model, bert_tokenizer: bool) -> str:
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    _tokenizer(_vocab(), bert=bert_tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random GPT-2 with dropout off, as a local model folder."""
    return _model_folder(tmp_path_factory, "tiny-gpt2",
                         GPT2Model(_tiny_gpt2_config(_vocab())), bert_tokenizer=False)


@pytest.fixture(scope="session")
def tiny_gpt2_lm(tmp_path_factory) -> str:
    """The same GPT-2 as a language model (Conv1D layers, tied LM head)."""
    return _model_folder(tmp_path_factory, "tiny-gpt2-lm",
                         GPT2LMHeadModel(_tiny_gpt2_config(_vocab())), bert_tokenizer=False)


@pytest.fixture(scope="session")
def tiny_llama_lm(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random Llama language model (q_proj/v_proj, RoPE, RMSNorm)."""
    config = LlamaConfig(vocab_size=len(_vocab()), hidden_size=32, num_hidden_layers=2,
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
