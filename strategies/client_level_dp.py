"""DP-FedAvg (client-level DP) over what travels: clip, fixed denominator, noise.

The same checks as `LoraFedAvg` (fail closed on errors, missing replies, a foreign A),
then `fed_dplora.dp.fedavg.dp_fedavg` instead of a weighted mean: every client counts
once whatever its size, which is what bounds one client's influence.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message

from fed_dplora.aggregation import aggregation_error
from fed_dplora.dp.fedavg import dp_fedavg
from fed_dplora.dp.noise import RandomSource
from fed_dplora.privacy.plan import ClientLevelPlan
from strategies.lora_fedavg import LoraFedAvg, TrainRound


class DpFedAvg(LoraFedAvg):
    def __init__(self, a_fingerprint: str | None, shared: dict[str, np.ndarray],
                 plan: ClientLevelPlan) -> None:
        super().__init__(a_fingerprint, shared)
        self.plan = plan

    def aggregate_train(self, replies: list[Message], expected: list[int],
                        global_arrays: dict[str, np.ndarray], rng: RandomSource
                        ) -> TrainRound:
        """Noised mean of clipped updates; with no replies, noise alone (as accounted)."""
        updates, weights, metrics, bytes_up = self.collect(replies, expected)
        arrays, stats = dp_fedavg(global_arrays, updates, self.plan.clip_norm,
                                  self.plan.noise_multiplier, self.plan.expected_clients,
                                  rng)
        error = aggregation_error(updates, weights, self.shared) if updates else 0.0
        return TrainRound(arrays, metrics, error, bytes_up,
                          update_clip_fraction=stats.clip_fraction)
