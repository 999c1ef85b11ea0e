"""A cross-silo deployment on this machine, as docs/deployment.md describes it: a
SuperLink with TLS and SuperNode authentication, its CLI connection "hospitals", and
SuperNodes that each run their site's installed ClientApp through the site runner
(`--isolation process`, `fed-dplora-site run`), or Flower's own executor (`stock`).
On 127.0.0.1, or with a `NetLab`, each party in its own network namespace.

Every process runs in its own session in a temporary FLWR_HOME and is stopped with its
whole process group (`stop_all`, also when a test fails).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from experiments.flwr_job import REPO, free_port
from experiments.netlab import COORDINATOR, NetLab
from fed_dplora.config.specs import DEFAULT_MODEL
from fed_dplora.data.demo import LABELS, generate_site
from fed_dplora.ops.trial_certs import write_trial_certs

SITES = ("site-a", "site-b")
LAB_PORT = 9093  # in namespaces every party has its own ports
RUN_TIMEOUT_S = 900
STREAM_GRACE_S = 60  # flwr 1.42's log stream may outlive its run: closed this long after
POLL_S = 10  # between checks of a run's status (each one a `flwr ls`)
STARTED_RUN = re.compile(r"Successfully started run (\d+)")
log = logging.getLogger(__name__)


def write_site_csv(path: Path, site: int, records: int = 150) -> Path:
    """A hospital's own notes file: the demo generator's records of `site`, as a CSV."""
    texts, labels = generate_site(site, records, 0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels))
    return path


class Deployment:
    """One SuperLink (TLS, SuperNode auth), its CLI connection "hospitals", SuperNodes."""

    def __init__(self, tmp: Path, loopback: bool = True, lab: NetLab | None = None,
                 sites: tuple[str, ...] = SITES, models: str = DEFAULT_MODEL) -> None:
        self.tmp, self.lab, self.sites = tmp, lab, sites
        self.models = models  # each SuperNode's allow-list (node config models)
        self.port = LAB_PORT if lab else free_port()
        hosts = ("superlink.example.org", *((lab.address(COORDINATOR),) if lab else ()))
        self.certs = write_trial_certs(tmp / "certs", [*sites, "stranger"], hosts, loopback)
        self.env = {**os.environ, "FLWR_HOME": str(tmp / "flwr-home")}
        self.processes: dict[str, subprocess.Popen] = {}
        self.runtime_apis: dict[str, str] = {}  # SuperNode name -> its Runtime API
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "hospitals"\n\n[superlink.hospitals]\n'
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')

    def start(self, name: str, *command: str, party: str = COORDINATOR) -> subprocess.Popen:
        log = (self.tmp / f"{name}.log").open("a")
        self.processes[name] = subprocess.Popen(
            self.command(party, *command), env=self.env, cwd=self.tmp, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        return self.processes[name]

    def superlink(self, wait: bool = True, database: Path | None = None) -> None:
        c = self.certs
        self.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(c / "ca.crt"),
                   "--ssl-certfile", str(c / "superlink.crt"), "--ssl-keyfile",
                   str(c / "superlink.key"), "--enable-supernode-auth",
                   "--disable-runtime-dependency-installation",
                   *(("--host", "0.0.0.0") if self.lab else ()), "--port", str(self.port),
                   *(("--database", str(database)) if database else ()))
        if wait:  # the CLI gets through only where the certificate names the address
            self.wait_for(lambda: self.cli("supernode", "list", "hospitals").returncode == 0,
                          "the SuperLink to answer")

    def hospitals_online(self, **supernode_options) -> None:
        """The SuperLink, every hospital registered, their SuperNodes connected."""
        self.superlink()
        for site in self.sites:
            self.register(site)
            self.supernode(site, **supernode_options)
        self.wait_for(lambda: self.online() == len(self.sites), "every SuperNode")

    def register(self, site: str) -> None:
        out = self.cli("supernode", "register", str(self.certs / f"{site}.pub"), "hospitals")
        assert out.returncode == 0, out.stdout + out.stderr

    def supernode(self, site: str, *extra: str, key: str | None = None,
                  name: str | None = None, stock: bool = False, retries: int | None = 2,
                  superlink: str | None = None, **node_config) -> subprocess.Popen:
        """A hospital's SuperNode with its own data file; unless `stock`, in process
        isolation with the site runner beside it (`<name>.runner` in `processes`).
        `retries` None: it reconnects for ever (a SuperLink restart)."""
        name, party = name or site, site if self.lab else COORDINATOR
        data = self.tmp / f"{site}.csv"
        if not data.exists():
            write_site_csv(data, self.sites.index(site) if site in self.sites else 0)
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in
                          {"data-path": str(data), "site-id": site,
                           "labels": ",".join(LABELS), "models": self.models,
                           **node_config}.items())
        runtime, secret = free_port(), self.tmp / f"{name}.secret"
        secret.write_bytes(os.urandom(32))
        self.runtime_apis[name] = f"127.0.0.1:{runtime}"
        isolation = () if stock else ("--isolation", "process",
                                      "--superexec-auth-secret-file", str(secret))
        limits = () if retries is None else ("--max-retries", str(retries),
                                             "--max-wait-time", "10")
        node = self.start(
            name, "flower-supernode", "--superlink", superlink or self.superlink_address,
            "--auth-supernode-private-key", str(self.certs / (key or site)),
            "--node-config", config, "--port", str(runtime), *isolation, *limits,
            *(extra or ("--root-certificates", str(self.certs / "ca.crt"))), party=party)
        if not stock:
            self.start(f"{name}.runner", "fed-dplora-site", "run", "--runtime-api",
                       f"127.0.0.1:{runtime}", "--superexec-auth-secret-file", str(secret),
                       party=party)
        return node

    @property
    def superlink_address(self) -> str:
        host = self.lab.address(COORDINATOR) if self.lab else "127.0.0.1"
        return f"{host}:{self.port}"

    def delay_proxy(self, site: str, delay_ms: float) -> str:
        """A proxy in `site`'s namespace that delays its link to the SuperLink by
        `delay_ms` each way; returns the address its SuperNode should use."""
        port = free_port()
        self.start(f"{site}.proxy", sys.executable, "-m", "experiments.delay_proxy",
                   "--listen", f"127.0.0.1:{port}", "--to", self.superlink_address,
                   "--delay-ms", str(delay_ms), party=site)
        return f"127.0.0.1:{port}"

    def online(self) -> int:
        out = self.cli("supernode", "list", "hospitals", "--format", "json").stdout
        return sum(node.get("status") == "online" for node in json.loads(out)["nodes"])

    def run(self, config: str, app: Path = REPO) -> subprocess.CompletedProcess:
        """`flwr run --stream` until its run ends (stdout and stderr as one `stdout`). The
        run's status decides, not the stream: a stream still open `STREAM_GRACE_S` after
        `flwr ls` shows its run finished is closed (logged); a run unfinished after
        `RUN_TIMEOUT_S` raises with the end of every log."""
        out = self.tmp / f"flwr-run-{time.monotonic_ns()}.log"
        with out.open("w") as sink:
            process = subprocess.Popen(
                self.command(COORDINATOR, "flwr", "run", str(app), "hospitals", "--stream",
                             "--run-config", config),
                env=self.env, cwd=self.tmp, stdout=sink, stderr=subprocess.STDOUT, text=True)
            try:
                self._await_run(process, out)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=30)
        return subprocess.CompletedProcess(process.args, process.returncode,
                                           out.read_text(), "")

    def _await_run(self, process: subprocess.Popen, out: Path) -> None:
        deadline, finished_at = time.monotonic() + RUN_TIMEOUT_S, None
        while process.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"flwr run did not end in {RUN_TIMEOUT_S} s; "
                                   f"{self.ended_runners()}\n{self.log_tails(out)}")
            started = STARTED_RUN.search(out.read_text())
            if started and self.status(started.group(1)).startswith("finished"):
                finished_at = finished_at or time.monotonic()
                if time.monotonic() - finished_at > STREAM_GRACE_S:
                    log.warning("run %s finished %g s ago, its log stream still open: "
                                "closed", started.group(1), STREAM_GRACE_S)
                    return
            time.sleep(POLL_S)

    def log_tails(self, out: Path) -> str:
        """What a hung run leaves to read: the end of its streamed output, its status,
        and the end of each process's log (SuperLink, SuperNodes, site runners)."""
        tails = [f"--- flwr run --stream (runs: {self.statuses()})\n"
                 f"{out.read_text()[-3000:]}"]
        tails += [f"--- {name}.log\n{self.log(name)[-1500:]}" for name in self.processes
                  if (self.tmp / f"{name}.log").exists()]
        return "\n".join(tails)

    def ended_runners(self) -> str:
        """Which site runners have exited (a SuperNode without one waits for ever on its
        next task), with the end of each one's log."""
        ended = [name for name, process in self.processes.items()
                 if name.endswith(".runner") and process.poll() is not None]
        return f"site runners that exited: {ended or 'none'}" + "".join(
            f"\n--- {name}.log\n{self.log(name)[-2000:]}" for name in ended)

    def statuses(self) -> list[str]:
        return [run["status"] for run in self.runs()]

    def status(self, run_id: str) -> str:
        return next((run["status"] for run in self.runs() if run["run-id"] == run_id), "")

    def runs(self) -> list[dict]:
        """The SuperLink's runs, as `flwr ls --format json` lists them."""
        return json.loads(self.cli("ls", "hospitals", "--format", "json").stdout)["runs"]

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(COORDINATOR, "flwr", *args), env=self.env,
                              cwd=self.tmp, capture_output=True, text=True, timeout=120)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    @staticmethod
    def wait_for(condition, what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(1)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop the process and its children (a SuperNode's flower-superexec outlives
        it), and the site runner that serves it."""
        for each in (name, f"{name}.runner"):
            process = self.processes.pop(each, None)
            if process is None:
                continue
            with contextlib.suppress(ProcessLookupError):  # the whole group already ended
                os.killpg(process.pid, sig)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def command(self, party: str, *argv: str) -> list[str]:
        """`argv` as `party` runs it (in its namespace, with a lab)."""
        return self.lab.command(party, *argv) if self.lab else list(argv)
