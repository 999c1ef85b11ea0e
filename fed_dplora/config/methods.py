"""The aggregation methods a run may name: one registration line each.

A method's behaviour lives in its own module (`fed_dplora.methods.<name>`); its entry
here says where, and the run-config defaults it needs where the user left them "auto"
(learning rate: the regime study's tuning, docs/research.md, chose 0.1-0.3 for vanilla
under DP and saw it collapse to one class at 1.0, where FFA trains; RoLoRA trains A
as vanilla does, in its even rounds, so it starts from vanilla's value; Frozen-AB-R trains
only R between frozen factors, as FFA trains only B, so it starts from FFA's; FedSA
trains A and B as vanilla does; all three untuned). A method also says under which
privacy levels its guarantee covers all it lets leave the site.

`RENAMED` maps a method's earlier name to its current one: a run config naming the old
one is refused with the new name, and the committed studies (cells, study configs,
pre-registrations written under the old name) are read through `current_name`.
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
    "frozen-ab-r": MethodEntry("fed_dplora.methods.frozen_ab_r", learning_rate=1.0),
    "fedsa": MethodEntry(
        "fed_dplora.methods.fedsa", learning_rate=0.1, privacy_levels=("none", "sample"),
        why_not="each site's own B, and its per-site scores, come from un-noised training "
                "under client-level DP alone, and client-level DP covers only the released "
                "aggregate (A and head), not a site's scores under its own B"),
}


# old name -> (current name, why it changed)
RENAMED: dict[str, tuple[str, str]] = {
    "fed-sb": ("frozen-ab-r", "2026-12-07: it freezes A and B at a seeded random init and "
               "trains an r x r R between them; LoRA-SB's initialisation from an "
               "approximation of the first update is not implemented"),
}


def current_name(method: str) -> str:
    """A method's registered name, for a name it was once registered under."""
    return RENAMED[method][0] if method in RENAMED else method
