"""The config the fed-dplora ClientApp needs, for a user's own ServerApp."""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import ConfigRecord

from strategies import wire as p


def client_config(label_names: Sequence[str], *, noise_multiplier: float | None = None,
                  seed: int = 0, secure_noise: bool = True) -> ConfigRecord:
    """One ConfigRecord for `Strategy.start(train_config=..., evaluate_config=...)`.

    `label_names`: the federation's labels in the order the model's head uses.
    `noise_multiplier`: sigma for every site's DP-SGD (required when the run config asks
    for sample-level DP; a per-site sigma calibrated from a target epsilon is what the
    project's own ServerApp does). `seed`: the run seed; `LoraFedAvg` derives a seed per
    node and round from it, used only when `secure_noise` is false (simulation).
    This path keeps no privacy ledger: account for sigma, q and the rounds yourself
    (`fed_dplora.privacy`), or use the project's ServerApp.
    """
    config = ConfigRecord({p.WIRE: p.WIRE_VERSION, p.LABEL_NAMES: list(label_names),
                           p.ROUND_SEED: seed, p.SECURE_NOISE: secure_noise})
    if noise_multiplier is not None:
        config[p.NOISE_MULTIPLIER] = float(noise_multiplier)
    return config
