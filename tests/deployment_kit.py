"""A cross-silo deployment on this machine, as docs/deployment.md describes it: a
SuperLink with TLS and SuperNode authentication, its CLI connection "hospitals", and
SuperNodes that each run their site's installed ClientApp through the site runner
(`--isolation process`, `fed-dplora-site run`), or Flower's own executor (`stock`).

Every process runs in its own session in a temporary FLWR_HOME on free ports and is
stopped with its whole process group, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from fed_dplora.trial_certs import write_trial_certs
from flwr_cli import REPO, free_port
from helpers import write_site_csv

SITES = ("site-a", "site-b")


class Deployment:
    """One SuperLink (TLS, SuperNode auth), its CLI connection "hospitals", SuperNodes."""

    def __init__(self, tmp: Path, loopback: bool = True) -> None:
        self.tmp, self.port = tmp, free_port()
        self.certs = write_trial_certs(tmp / "certs", [*SITES, "stranger"],
                                       ("superlink.example.org",), loopback)
        self.env = {**os.environ, "FLWR_HOME": str(tmp / "flwr-home")}
        self.processes: dict[str, subprocess.Popen] = {}
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "hospitals"\n\n[superlink.hospitals]\n'
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')

    def start(self, name: str, *command: str) -> subprocess.Popen:
        log = (self.tmp / f"{name}.log").open("w")
        self.processes[name] = subprocess.Popen(
            command, env=self.env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        return self.processes[name]

    def superlink(self, wait: bool = True) -> None:
        c = self.certs
        self.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(c / "ca.crt"),
                   "--ssl-certfile", str(c / "superlink.crt"), "--ssl-keyfile",
                   str(c / "superlink.key"), "--enable-supernode-auth",
                   "--port", str(self.port))
        if wait:  # the CLI gets through only where the certificate names the address
            self.wait_for(lambda: self.cli("supernode", "list", "hospitals").returncode == 0,
                          "the SuperLink to answer")

    def two_hospitals_online(self) -> None:
        """The SuperLink, both hospitals registered, their SuperNodes connected."""
        self.superlink()
        for site in SITES:
            self.register(site)
            self.supernode(site)
        self.wait_for(lambda: self.online() == len(SITES), "both SuperNodes")

    def register(self, site: str) -> None:
        out = self.cli("supernode", "register", str(self.certs / f"{site}.pub"), "hospitals")
        assert out.returncode == 0, out.stdout + out.stderr

    def supernode(self, site: str, *extra: str, key: str | None = None,
                  name: str | None = None, stock: bool = False, **node_config) -> subprocess.Popen:
        """A hospital's SuperNode with its own data file; unless `stock`, in process
        isolation with the site runner beside it (`<name>.runner` in `processes`)."""
        name = name or site
        data = self.tmp / f"{site}.csv"
        if not data.exists():
            write_site_csv(data, SITES.index(site) if site in SITES else 0)
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in
                          {"data-path": str(data), "site-id": site, **node_config}.items())
        runtime, secret = free_port(), self.tmp / f"{name}.secret"
        secret.write_bytes(os.urandom(32))
        isolation = () if stock else ("--isolation", "process",
                                      "--superexec-auth-secret-file", str(secret))
        node = self.start(
            name, "flower-supernode", "--superlink", f"127.0.0.1:{self.port}",
            "--auth-supernode-private-key", str(self.certs / (key or site)),
            "--node-config", config, "--port", str(runtime), *isolation,
            "--max-retries", "2", "--max-wait-time", "10",
            *(extra or ("--root-certificates", str(self.certs / "ca.crt"))))
        if not stock:
            self.start(f"{name}.runner", "fed-dplora-site", "run", "--runtime-api",
                       f"127.0.0.1:{runtime}", "--superexec-auth-secret-file", str(secret))
        return node

    def online(self) -> int:
        out = self.cli("supernode", "list", "hospitals", "--format", "json").stdout
        return sum(node.get("status") == "online" for node in json.loads(out)["nodes"])

    def run(self, config: str, app: Path = REPO) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", "run", str(app), "hospitals", "--stream",
                               "--run-config", config], env=self.env, cwd=self.tmp,
                              capture_output=True, text=True, timeout=600)

    def statuses(self) -> list[str]:
        out = self.cli("ls", "hospitals", "--format", "json").stdout
        return [run["status"] for run in json.loads(out)["runs"]]

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, cwd=self.tmp,
                              capture_output=True, text=True, timeout=120)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    @staticmethod
    def wait_for(condition, what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(1)

    def stop(self, name: str) -> None:
        """Stop the process and its children (a SuperNode's flower-superexec outlives
        it), and the site runner that serves it."""
        for each in (name, f"{name}.runner"):
            process = self.processes.pop(each, None)
            if process is None:
                continue
            with contextlib.suppress(ProcessLookupError):  # the whole group already ended
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)


