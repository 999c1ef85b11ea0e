"""Vanilla LoRA, the baseline: A and B both train and travel and are averaged apart, so
mean(B) mean(A) differs from mean(B A) (the aggregation error each round reports)."""

from fed_dplora.methods.base import LoraMethod

METHOD = LoraMethod("vanilla", a_trains=True, shared_a=False)
