"""Tokenize once per process; pad each physical batch to its own longest sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fed_dplora.data.sources import DataError, LabelledText


@dataclass(frozen=True)
class TokenizedData:
    input_ids: tuple[torch.Tensor, ...]  # variable-length 1-D int64 tensors
    labels: torch.Tensor | None  # int64 class ids; None for text-only tasks
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def length(self, index: int) -> int:
        """Tokens in record `index`."""
        return len(self.input_ids[index])

    def batch(self, indices: list[int], device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input_ids, attention_mask, labels or None) of `indices`, right-padded, on
        device."""
        rows = [self.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        labels = None if self.labels is None else self.labels[indices].to(device)
        return ids.to(device), mask.to(device), labels


def tokenize(data: LabelledText, tokenizer: PreTrainedTokenizerBase, max_length: int,
             label_names: tuple[str, ...] | None) -> TokenizedData:
    """Token ids of every text (truncated to `max_length`) and, unless `label_names` is
    None (a text-only task), each label's index in `label_names`."""
    encoded = tokenizer(list(data.texts), truncation=True, max_length=max_length)
    ids = tuple(torch.tensor(row, dtype=torch.long) for row in encoded["input_ids"])
    pad = int(tokenizer.pad_token_id)
    if label_names is None:
        return TokenizedData(ids, None, pad)
    ids_of = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(data.labels) - set(ids_of))
    if unknown:
        raise DataError(f"labels {unknown[:5]} are not among the federation's labels "
                        f"{list(label_names)}")
    return TokenizedData(ids, torch.tensor([ids_of[label] for label in data.labels]), pad)
