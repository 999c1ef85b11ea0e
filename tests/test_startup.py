"""Start-up: the Flower app modules import light, and the heavy halves load in background."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fed_dplora.ops.preload import preload

HEAVY = ("torch", "transformers", "peft", "opacus", "dp_accounting", "flwr_datasets",
         "pandas")


def heavy_modules_after(statement: str) -> str:
    """Which of HEAVY a fresh interpreter has imported after running `statement`."""
    code = f"import sys; {statement}; print([m for m in {HEAVY!r} if m in sys.modules])"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_app_modules_import_without_torch_transformers_peft_or_opacus():
    # Flower imports both apps in the simulation driver while it starts Ray.
    assert heavy_modules_after("import clients.client_app, server.server_app") == "[]"


def test_the_strategies_a_user_imports_pull_in_no_torch_or_dp_accounting():
    assert heavy_modules_after(
        "from strategies import FfaFedAvg, LoraFedAvg, client_config, to_record") == "[]"


def test_preload_imports_once_and_surfaces_import_errors():
    future = preload("server.federation")
    assert preload("server.federation") is future
    assert hasattr(future.result(timeout=120), "run_federation")
    with pytest.raises(ModuleNotFoundError, match="no_such_module_xyz"):
        preload("fed_dplora.no_such_module_xyz").result(timeout=10)
