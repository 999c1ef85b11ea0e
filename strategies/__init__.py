"""Flower strategies of fed-dplora, to take into any ServerApp (the project's own is
`server.server_app`), and the wire format they share with the ClientApp.

    from strategies import FfaFedAvg, client_config, to_record

Names load on first use, so importing this package pulls in neither torch nor
dp-accounting (the ServerApp's start-up depends on it).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LoraFedAvg": "strategies.lora_fedavg",
    "FfaFedAvg": "strategies.lora_fedavg",
    "ClientLevelDpFedAvg": "strategies.client_level_dp",
    "client_config": "strategies.round_config",
    "to_record": "strategies.wire",
    "to_arrays": "strategies.wire",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'strategies' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
