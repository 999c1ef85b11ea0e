"""Sequence classification: a pooled backbone and a linear head; loss per record."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from fed_dplora.class_scores import ClassCounts
from fed_dplora.seeded_init import seeded_uniform
from fed_dplora.tasks.base import EvalSums, Task

HEAD = "classifier"


class TextClassifier(nn.Module):
    """A transformer backbone, a pooling of its token states, and a linear head.

    Mean pooling suits sentence-embedding checkpoints (all-MiniLM-L6-v2): a linear probe
    on mean-pooled states beats one on BERT's pooler by a wide margin.
    """

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        setattr(self, HEAD, nn.Linear(backbone.config.hidden_size, num_labels))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.backbone(input_ids=input_ids,
                               attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = states[:, 0]
        elif self.pooling == "last":
            last = attention_mask.sum(dim=1) - 1
            pooled = states[torch.arange(states.shape[0], device=states.device), last]
        else:
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return getattr(self, HEAD)(pooled)


class SequenceClassification(Task):
    trained_modules = (HEAD,)

    def build_base(self, source: str, num_labels: int, pooling: str, seed: int) -> nn.Module:
        model = TextClassifier(AutoModel.from_pretrained(source), num_labels, pooling)
        head = getattr(model, HEAD)
        with torch.no_grad():
            head.weight.copy_(seeded_uniform(head.weight.shape, seed, HEAD)
                              / math.sqrt(head.weight.shape[1]))
            head.bias.zero_()
        return model.requires_grad_(False)

    def loss_sum(self, logits, input_ids, mask, labels) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, reduction="sum")

    def eval_weight_per_record(self, max_length: int) -> int:
        return 1  # a record is one prediction

    def eval_sums(self, logits, input_ids, mask, labels) -> EvalSums:
        logits = logits.float()
        predicted = logits.argmax(dim=-1)
        hits = predicted == labels
        width = logits.shape[-1]
        counts = ClassCounts(*(tuple(torch.bincount(values, minlength=width).tolist())
                               for values in (labels, predicted, labels[hits])))
        return EvalSums(float(F.cross_entropy(logits, labels, reduction="sum")),
                        int(hits.sum()), len(labels), counts)
