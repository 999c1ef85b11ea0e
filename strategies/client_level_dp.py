"""Client-level DP (DP-FedAvg) as a strategy wrapper, in the shape of Flower's
`DifferentialPrivacyServerSideFixedClipping`, with the semantics fed-dplora accounts for.

Privacy (with `dp_fedavg_round` in `fed_dplora.privacy.events`): unit = all data of one
client. The wrapped `LoraFedAvg` screens the replies (a failed or invalid one is never
used); each valid update (returned tensors minus the global ones, every tensor that
travels, as one vector) is clipped to norm S; the clipped updates are summed unweighted,
N(0, (z S)^2) is added per coordinate, also when no reply arrived, and the sum is
divided by the fixed expected number of clients m, never by the number that answered.
Dropouts and excluded sites therefore keep the accounting valid (conservative for
utility). Flower's wrapper averages by example counts and skips the noise when no reply
arrived; both would void the guarantee accounted here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fed_dplora.aggregation import aggregation_error
from strategies.lora_fedavg import LoraFedAvg, released
from strategies.wire import to_record


class ClientLevelDpFedAvg(Strategy):
    """DP-FedAvg around a `LoraFedAvg` / `FfaFedAvg`.

    `noise_for_round(server_round)` returns the round's `RandomSource`; by default the
    OS CSPRNG (`fed_dplora.dp.noise.SecureRandom`), never a seed anyone could know.
    """

    def __init__(self, strategy: LoraFedAvg, noise_multiplier: float, clip_norm: float,
                 expected_clients: int, noise_for_round: Callable[[int], object] | None = None
                 ) -> None:
        if noise_multiplier <= 0 or clip_norm <= 0 or expected_clients <= 0:
            raise ValueError(f"DP-FedAvg needs z > 0, S > 0 and m > 0, got "
                             f"{noise_multiplier}, {clip_norm}, {expected_clients}")
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.expected_clients = expected_clients
        self.noise_for_round = noise_for_round or _secure_noise

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Global + (sum of clipped updates + noise) / m over the tensors the round
        trains (the rest held); None when the round is lost."""
        from fed_dplora.dp.fedavg import dp_fedavg  # torch: only where DP-FedAvg runs
        inner = self.strategy
        sent, trained = inner.pop_round(server_round)
        screened = inner.screen_train(server_round, replies)
        if inner.is_lost(screened):
            return None, inner.train_metrics(screened, None, lost=True)
        updates, weights = inner.updates(screened)
        arrays, stats = dp_fedavg({k: sent[k] for k in trained}, updates, self.clip_norm,
                                  self.noise_multiplier, self.expected_clients,
                                  self.noise_for_round(server_round))
        error = (aggregation_error(updates, weights, inner.held(sent, trained))
                 if updates else None)
        metrics = inner.train_metrics(screened, error)
        metrics["update-clip-fraction"] = stats.clip_fraction
        return to_record(released(sent, arrays)), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


def _secure_noise(server_round: int):
    from fed_dplora.dp.noise import SecureRandom
    return SecureRandom()
