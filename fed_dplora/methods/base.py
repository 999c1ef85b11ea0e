"""What an aggregation method decides at the sites and the server."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fed_dplora.seeded_init import seed_lora_a


@dataclass(frozen=True)
class LoraMethod:
    """An aggregation method of LoRA adapters under DP.

    What trains is what travels (`fed_dplora.lora.adapters`): every LoRA B and the
    task's head always; A where `a_trains`. Where A does not train it holds the seeded
    init on every party, and `shared_a` makes the server reject a reply whose A
    fingerprint differs from its own (FFA's exactness rests on it).
    """

    name: str
    a_trains: bool
    shared_a: bool

    def prepare(self, model: nn.Module, seed: int) -> None:
        """Set every A from the run seed, trainable or frozen as the method says."""
        seed_lora_a(model, seed, trainable=self.a_trains)
