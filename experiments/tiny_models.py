"""Tiny random-init models with an in-process word-level tokenizer over the demo
vocabulary, saved as local model folders (offline: tests and the attacker's harness)."""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from fed_dplora.data.demo import generate_site

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def demo_vocab() -> dict[str, int]:
    """Every word and punctuation mark of three demo sites' records, after the specials."""
    words = set()
    for site in range(3):
        for text in generate_site(site, 300, 0)[0]:
            words.update(re.findall(r"\w+|[^\w\s]", text))
    return {w: i for i, w in enumerate(SPECIALS + sorted(words))}


def word_tokenizer(vocab: dict[str, int], bert: bool) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    if bert:
        return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]",
                                       unk_token="[UNK]", cls_token="[CLS]",
                                       sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                   eos_token="[SEP]")  # GPT-2 style: no pad token


def save_tiny_bert(folder: Path) -> str:
    """A 2-layer, 32-wide random BERT with dropout off, saved in `folder`."""
    vocab = demo_vocab()
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    word_tokenizer(vocab, bert=True).save_pretrained(folder)
    return str(folder)
