"""Scale-out: the Flower simulation attached to a Ray cluster that is already running.

flwr 1.42's Ray backend calls `ray.init()` without an address, so `RAY_ADDRESS` must be
in the environment of the SuperLink that runs the simulation; `flwr run .` starts its
local SuperLink with its own environment. The cluster here is one head node on
127.0.0.1, started with `--block` in its own temp dir so it is stopped by pid and no
later run attaches to it by accident.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from flwr_cli import flwr_run, free_port, run_statuses

pytestmark = pytest.mark.e2e


@pytest.fixture()
def ray_cluster():
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--temp-dir", str(temp), "--port", str(port),
         "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
         "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.monotonic() + 120
    while subprocess.run(["ray", "status", "--address", f"127.0.0.1:{port}"],
                         capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, "the Ray head did not start"
        time.sleep(2)
    yield f"127.0.0.1:{port}", temp
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=60)
    shutil.rmtree(temp, ignore_errors=True)


def test_the_simulation_runs_on_an_existing_ray_cluster(ray_cluster, flwr_env, tiny_bert,
                                                        tmp_path):
    address, temp = ray_cluster
    env = {**flwr_env, "RAY_ADDRESS": address}
    out = tmp_path / "runs"
    proc = flwr_run(env, f'model.name="{tiny_bert}" output-dir="{out}" num-server-rounds=1 '
                         'clients-per-round=2 local-steps=1 batch-size=32 '
                         'physical-batch-size=16 data.demo-records-per-site=150', tmp_path)
    assert run_statuses(env, tmp_path) == ["finished:completed"], proc.stdout[-3000:]
    logs = list((temp / "session_latest" / "logs").glob("*"))
    assert any("ClientAppActor" in log.read_text(errors="ignore") for log in logs
               if log.is_file()), "the clients did not run on the cluster"
