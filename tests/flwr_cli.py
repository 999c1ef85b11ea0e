"""Running the `flwr` command line the way a user does, for the end-to-end tests: a
private FLWR_HOME on free ports (the `flwr_env` fixture in conftest.py), `flwr run`,
and the runs' real status from `flwr ls` (`--stream` exits 0 even when a run fails)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from experiments.flwr_job import (  # noqa: F401 (re-exported for the tests)
    REPO, flwr_environment, free_port, stop_local_superlink)

SUPERNODES = 3


def flwr_run(env, run_config: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["flwr", "run", str(REPO), "--stream", "--run-config", run_config,
         "--federation-config", f"num-supernodes={SUPERNODES} client-resources-num-cpus=1"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def run_statuses(env, cwd: Path) -> list[str]:
    out = subprocess.run(["flwr", "ls", "--format", "json"], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=120).stdout
    return [run["status"] for run in json.loads(out)["runs"]]
