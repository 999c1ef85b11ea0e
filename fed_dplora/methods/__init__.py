"""Aggregation methods as plug-ins: a module each (`METHOD`), registered by name in
`fed_dplora.config.methods`; an unknown name is refused there, when the run config is
parsed."""

from __future__ import annotations

from importlib import import_module

from fed_dplora.config.methods import METHODS
from fed_dplora.methods.base import LoraMethod


def method_for(name: str) -> LoraMethod:
    """The registered method `name` (the run config was checked against the registry)."""
    return import_module(METHODS[name].module).METHOD
