"""What an aggregation method decides at the sites and the server.

Torch-free at import (the server's strategies read a method's rounds without torch);
`prepare` imports the seeded init where a model is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# The kinds of tensor: LoRA A and B, Frozen-AB-R's R between them, the task's trained head.
KINDS = ("A", "B", "R", "head")


def kind_of(name: str) -> str:
    """"A", "B" or "R" for a LoRA tensor (R lives inside its A's module), "head" for
    anything else that trains."""
    for kind in ("R", "A", "B"):
        if f".lora_{kind}." in name:
            return kind
    return "head"


@dataclass(frozen=True)
class LoraMethod:
    """An aggregation method of LoRA adapters under DP.

    The global tensors, which the server holds, sends every round and combines, are
    what the built model trains (`fed_dplora.lora.adapters`): every LoRA B and the
    task's head always; A where `a_trains`. Where A does not train it holds the seeded
    init on every party, and `shared_a` makes the server reject a reply whose
    fingerprint of the frozen LoRA factors (A; B too under Frozen-AB-R) differs from its own
    (the exactness of FFA and Frozen-AB-R rests on it).

    `alternation` (empty: every global tensor trains every round) gives, round after
    round and then again, the kinds of global tensor that train and travel back; the
    others are held at the values the server sent. `local` names the kinds of tensor
    that train but never leave the site (FedSA's B): each site keeps its own between
    rounds, and they are not global.
    """

    name: str
    a_trains: bool
    shared_a: bool
    alternation: tuple[frozenset[str], ...] = ()
    local: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = ({k for kinds in self.alternation for k in kinds} | self.local) - set(KINDS)
        if unknown:
            raise ValueError(f"method {self.name!r}: names kinds {sorted(unknown)}; "
                             f"kinds are {list(KINDS)}")

    def prepare(self, model: nn.Module, seed: int) -> None:
        """Set every A from the run seed, trainable or frozen as the method says."""
        from fed_dplora.seeded_init import seed_lora_a
        seed_lora_a(model, seed, trainable=self.a_trains)

    def exportable(self, model: nn.Module) -> nn.Module:
        """The model as a standard PEFT adapter saves it (Frozen-AB-R folds its R in)."""
        return model

    def global_names(self, trainable: Iterable[str]) -> set[str]:
        """Of the tensors a built model trains, those the server holds and combines."""
        return {name for name in trainable if kind_of(name) not in self.local}

    def trained(self, global_names: Iterable[str], server_round: int) -> set[str]:
        """The global tensors that train (and travel back) in `server_round` (from 1)."""
        if not self.alternation:
            return set(global_names)
        kinds = self.alternation[(server_round - 1) % len(self.alternation)]
        return {name for name in global_names if kind_of(name) in kinds}
