"""The aggregation methods a run may name: one registration line each.

A method's behaviour lives in its own module (`fed_dplora.methods.<name>`); its entry
here says where, and the run-config defaults it needs where the user left them "auto"
(learning rate: the regime study's tuning, docs/research.md, chose 0.1-0.3 for vanilla
under DP and saw it collapse to one class at 1.0, where FFA trains; RoLoRA trains A
as vanilla does, in its even rounds, so it starts from vanilla's value; Fed-SB trains
only R between frozen factors, as FFA trains only B, so it starts from FFA's; FedSA
trains A and B as vanilla does; all three untuned). A method also says under which
privacy levels its guarantee covers all it lets leave the site.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodEntry:
    module: str  # defines METHOD, a fed_dplora.methods.base.LoraMethod
    learning_rate: float  # learning-rate="auto"
    # privacy.level values whose guarantee holds for everything the method lets leave
    privacy_levels: tuple[str, ...] = ("none", "sample", "client", "both")
    why_not: str = ""  # what the other levels would not cover


METHODS: dict[str, MethodEntry] = {
    "ffa": MethodEntry("fed_dplora.methods.ffa", learning_rate=1.0),
    "vanilla": MethodEntry("fed_dplora.methods.vanilla", learning_rate=0.1),
    "rolora": MethodEntry("fed_dplora.methods.rolora", learning_rate=0.1),
    "fed-sb": MethodEntry("fed_dplora.methods.fed_sb", learning_rate=1.0),
    "fedsa": MethodEntry(
        "fed_dplora.methods.fedsa", learning_rate=0.1, privacy_levels=("none", "sample"),
        why_not="each site's own B, and its per-site scores, come from un-noised training "
                "under client-level DP alone, and client-level DP covers only the released "
                "aggregate (A and head), not a site's scores under its own B"),
}
