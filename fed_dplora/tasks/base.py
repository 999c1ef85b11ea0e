"""The task interface: the few things that differ between fine-tuning tasks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from fed_dplora.class_scores import ClassCounts


@dataclass(frozen=True)
class EvalSums:
    """One evaluation batch: summed loss, correct predictions, and what both count
    (records for classification, predicted tokens for causal LM)."""

    loss: float
    correct: int
    weight: int
    classes: ClassCounts | None = None  # classification: per-class counts


class Task(ABC):
    """A fine-tuning task. Models take (input_ids, attention_mask) and return logits."""

    trained_modules: tuple[str, ...]  # non-LoRA modules that train and travel (heads)

    @abstractmethod
    def build_base(self, source: str, num_labels: int, pooling: str, seed: int) -> nn.Module:
        """The pretrained model from `source` (a local folder or hub id), with any new
        head seeded from `seed`, on CPU and fully frozen."""

    @abstractmethod
    def loss_sum(self, logits: torch.Tensor, input_ids: torch.Tensor,
                 mask: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The sum over the batch of each record's own loss: a record's loss depends on
        that record alone (what per-sample clipping needs)."""

    @abstractmethod
    def eval_weight_per_record(self, max_length: int) -> int:
        """The most one record can count in `EvalSums.weight` at `max_length` tokens (what
        the server bounds a site's evaluation weight by)."""

    @abstractmethod
    def eval_sums(self, logits: torch.Tensor, input_ids: torch.Tensor,
                  mask: torch.Tensor, labels: torch.Tensor | None) -> EvalSums:
        """Summed loss and correct predictions of one evaluation batch."""
