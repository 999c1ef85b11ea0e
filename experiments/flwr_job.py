"""Run `flwr run .` jobs the way a user does, in a private FLWR_HOME on free ports.

Experiments train through this (never through a second training loop): the same
ServerApp and ClientApp, a real local SuperLink and Ray simulation. `flwr run --stream`
exits 0 even when the ServerApp fails, so each job's status is read back with
`flwr ls`; a failed job raises with the end of its output. The SuperLink this starts is
stopped by pid on exit.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("fed_dplora.experiments")


class JobFailed(RuntimeError):
    """A `flwr run` job did not finish with status finished:completed."""


def app_defaults() -> dict[str, Any]:
    """The app's run config defaults, as pyproject.toml sets them."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["tool"]["flwr"]["app"]["config"]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


class LocalFederation:
    """`with LocalFederation(4) as fed: fed.run({...})`: one SuperLink, many jobs."""

    def __init__(self, num_supernodes: int, cpus_per_client: int = 1,
                 gpus_per_client: float = 0.0, timeout_s: int = 6 * 3600) -> None:
        self.federation_config = (f"num-supernodes={num_supernodes} "
                                  f"client-resources-num-cpus={cpus_per_client} "
                                  f"client-resources-num-gpus={gpus_per_client}")
        self.timeout_s = timeout_s
        self.home = Path(tempfile.mkdtemp(prefix="fed-dplora-flwr-"))
        self.env = flwr_environment(self.home)

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        stop_local_superlink(self.home)

    def run(self, run_config: dict[str, Any], app: Path = REPO) -> Path:
        """Run one job of `app` (fed-dplora unless given); returns its run folder
        (`output-dir`/`run-name`, both required)."""
        output = Path(run_config["output-dir"]) / run_config["run-name"]
        config = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        before = set(self._statuses())
        proc = subprocess.run(
            ["flwr", "run", str(app), "--stream", "--run-config", config,
             "--federation-config", self.federation_config],
            env=self.env, cwd=REPO, capture_output=True, text=True, timeout=self.timeout_s)
        new = {run_id: status for run_id, status in self._statuses().items()
               if run_id not in before}
        if list(new.values()) != ["finished:completed"]:
            raise JobFailed(f"flwr run {output.name}: status {new or 'missing'}\n"
                            + proc.stdout[-4000:] + proc.stderr[-2000:])
        return output

    def _statuses(self) -> dict[str, str]:
        out = subprocess.run(["flwr", "ls", "--format", "json"], env=self.env, cwd=REPO,
                             capture_output=True, text=True, timeout=300).stdout
        return {run["run-id"]: run["status"] for run in json.loads(out)["runs"]}


def stop_local_superlink(home: Path) -> None:
    """Stop the local SuperLink that `flwr run` left for the FLWR_HOME `home`."""
    pids = subprocess.run(["pgrep", "-f", f"flower-superlink.*{home}"],
                          capture_output=True, text=True).stdout.split()
    for pid in pids:
        os.kill(int(pid), signal.SIGTERM)


def flwr_environment(home: Path) -> dict[str, str]:
    """The environment of a private `flwr` installation in `home` on free ports."""
    return {**os.environ, "FLWR_HOME": str(home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


_HANDED_OUT: set[int] = set()
LOWEST_PORT = 20000


def _ephemeral_floor() -> int:
    """The lowest port the kernel gives outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port on 127.0.0.1 that is free now, below the kernel's ephemeral range and
    never handed out before by this process. A port from `bind(0)` is itself
    ephemeral: between this call and a server binding it, an outgoing connection
    (a SuperNode dialling the SuperLink) could take it, and the server would fail to
    start."""
    candidates = [p for p in range(LOWEST_PORT, _ephemeral_floor()) if p not in _HANDED_OUT]
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {LOWEST_PORT}-{_ephemeral_floor()}")
