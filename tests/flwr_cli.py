"""Running the `flwr` command line the way a user does, for the end-to-end tests: a
private FLWR_HOME on free ports (the `flwr_env` fixture in conftest.py), `flwr run`,
and the runs' real status from `flwr ls` (`--stream` exits 0 even when a run fails)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUPERNODES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_environment(home: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


def stop_local_superlink(home: Path) -> None:
    pids = subprocess.run(["pgrep", "-f", f"flower-superlink.*{home}"],
                          capture_output=True, text=True).stdout.split()
    for pid in pids:
        os.kill(int(pid), signal.SIGTERM)


def flwr_run(env, run_config: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["flwr", "run", str(REPO), "--stream", "--run-config", run_config,
         "--federation-config", f"num-supernodes={SUPERNODES} client-resources-num-cpus=1"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def run_statuses(env, cwd: Path) -> list[str]:
    out = subprocess.run(["flwr", "ls", "--format", "json"], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=120).stdout
    return [run["status"] for run in json.loads(out)["runs"]]
