"""Frozen-AB-R: every A and B frozen at a seeded, identical random init on every party;
an r x r matrix R between them (B R A) trains and travels, zero at the start. Averaging
R is exact, mean_i(B R_i A) = B mean_i(R_i) A, and a reply carries r^2 numbers per
adapted layer, so DP noise covers far fewer coordinates than B's. The init reads no data
(seeded from the run seed), so it costs no privacy; the saved adapter is folded into
standard LoRA (A' = R A).

It shares the B R A structure and the exact averaging of R with LoRA-SB and Fed-SB
(Singhal et al., 2025, arXiv:2502.15436), not their initialisation of A and B from an
approximation of the first full update: here A and B are random."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fed_dplora.methods.base import LoraMethod

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class FrozenAbR(LoraMethod):
    def prepare(self, model: nn.Module, seed: int) -> None:
        """A and B seeded and frozen, then an R (zero) after every A."""
        from fed_dplora.methods.r_modules import insert_r
        from fed_dplora.seeded_init import seed_lora_a, seed_lora_b
        seed_lora_a(model, seed, trainable=False)
        seed_lora_b(model, seed)
        insert_r(model)

    def exportable(self, model: nn.Module) -> nn.Module:
        from fed_dplora.methods.r_modules import folded
        return folded(model)


METHOD = FrozenAbR("frozen-ab-r", a_trains=False, shared_a=True)
