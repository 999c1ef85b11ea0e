"""What a fine-tuning task adds to the shared DP-LoRA machinery: its model, its batches'
per-sample loss, its evaluation sums, and what the census must check.

`task_for(spec.task)` is the one place a run's task is looked up; everything else
(trainer, apps, strategies, ledger, guards) is the same for every task. This module
stays light (no torch): the census and data loading ask `uses_labels` before any
training code is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fed_dplora.config import TEXT_ONLY_TASKS

if TYPE_CHECKING:
    from fed_dplora.tasks.base import Task


def uses_labels(name: str) -> bool:
    """Whether task `name` reads a label column (causal-lm reads text only)."""
    return name not in TEXT_ONLY_TASKS


def task_for(name: str) -> "Task":
    """The task named by run-config `task` (validated by `fed_dplora.config`)."""
    if name == "causal-lm":
        from fed_dplora.tasks.causal_lm import CausalLm
        return CausalLm()
    from fed_dplora.tasks.classification import SequenceClassification
    return SequenceClassification()
