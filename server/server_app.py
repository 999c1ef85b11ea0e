"""Flower ServerApp: run config -> spec -> census -> the federated run.

Start-up: Flower imports this module while it starts Ray, and the simulation's clients
wait on the census. So this module imports only Flower and light parts, and the heavy
half (`server.federation`: torch, transformers, PEFT, dp-accounting) is imported in
a background thread while the clients answer the census.
"""

from __future__ import annotations

import logging
import sys
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_dplora.config import ConfigError, RunSpec, parse_run_config
from fed_dplora.ops.preload import preload
from fed_dplora.tasks import uses_labels
from server.census import census, wait_for_nodes

log = logging.getLogger("fed_dplora.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    _configure_logging()
    try:
        _run(grid, context)
    except Exception as exc:
        # Flower logs the traceback after this: the first ERROR line says what is wrong.
        log.error("%s: %s", type(exc).__name__, exc)
        raise


def _run(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    _refuse_runtime_env()
    spec = parse_run_config(context.run_config)
    secure = _secure_noise(spec, grid)
    nodes = wait_for_nodes(grid, spec.clients_per_round)
    federation = preload("server.federation")  # loads while the clients answer
    sites = census(grid, nodes, spec.failure.round_timeout, secure, uses_labels(spec.task))
    federation.result().run_federation(grid, context, spec, secure, sites, started)


def _secure_noise(spec: RunSpec, grid: Grid) -> bool:
    """privacy.secure-noise, or "auto": seeded only inside a simulation. Outside it,
    client-level DP with seeded noise and sampling is refused: anyone with the run
    config could recompute both, so no client-level epsilon would hold."""
    simulated = in_simulation(grid)
    if spec.privacy.secure_noise is None:
        return not simulated
    if not spec.privacy.secure_noise and spec.privacy.client_level and not simulated:
        raise ConfigError(
            f"privacy.secure-noise=false with privacy.level={spec.privacy.level!r} outside "
            "Flower's simulation: the server's DP-FedAvg noise and client sampling would "
            "follow from the run seed, so no client-level guarantee would hold; use "
            "privacy.secure-noise=\"auto\" (or true)")
    return spec.privacy.secure_noise


def in_simulation(grid: Grid) -> bool:
    """True under Flower's simulation runtime (its in-memory grid)."""
    return type(grid).__name__ == "InMemoryGrid"


def _configure_logging() -> None:
    """INFO for our loggers; Flower's root handler prints (and streams) them."""
    logging.getLogger("fed_dplora").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")


def _refuse_runtime_env() -> None:
    """Flower's per-run dependency re-install would swap torch under us: refuse it."""
    if "runtime-envs" in sys.prefix:
        raise RuntimeError(
            f"the ServerApp runs in Flower's per-run environment {sys.prefix}, not the "
            "installed one; set FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 before "
            "starting flwr / flower-superlink (installing fed-dplora sets it by default)")
