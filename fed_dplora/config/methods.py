"""The aggregation methods a run may name: one registration line each.

A method's behaviour lives in its own module (`fed_dplora.methods.<name>`); its entry
here says where, and the run-config defaults it needs where the user left them "auto"
(learning rate: the regime study's tuning, docs/research.md, chose 0.1-0.3 for vanilla
under DP and saw it collapse to one class at 1.0, where FFA trains; RoLoRA trains A
as vanilla does, in its even rounds, so it starts from vanilla's value; Fed-SB trains
only R between frozen factors, as FFA trains only B, so it starts from FFA's; both
untuned).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodEntry:
    module: str  # defines METHOD, a fed_dplora.methods.base.LoraMethod
    learning_rate: float  # learning-rate="auto"


METHODS: dict[str, MethodEntry] = {
    "ffa": MethodEntry("fed_dplora.methods.ffa", learning_rate=1.0),
    "vanilla": MethodEntry("fed_dplora.methods.vanilla", learning_rate=0.1),
    "rolora": MethodEntry("fed_dplora.methods.rolora", learning_rate=0.1),
    "fed-sb": MethodEntry("fed_dplora.methods.fed_sb", learning_rate=1.0),
}
