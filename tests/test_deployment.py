"""Cross-silo deployment on 127.0.0.1, as docs/deployment.md describes it: a SuperLink with
TLS and SuperNode authentication, registered SuperNodes each with its own data file,
`flwr run` against the SuperLink; refused SuperNodes; a site that leaves and rejoins.

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

import pytest

from fed_dplora.results import load_final_model, read_metrics
from fed_dplora.trial_certs import write_trial_certs
from flwr_cli import REPO, free_port
from helpers import write_site_csv
SITES = ("site-a", "site-b")
pytestmark = pytest.mark.deployment


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
                  name: str | None = None) -> subprocess.Popen:
        data = self.tmp / f"{site}.csv"
        if not data.exists():
            write_site_csv(data, SITES.index(site) if site in SITES else 0)
        return self.start(
            name or site, "flower-supernode", "--superlink", f"127.0.0.1:{self.port}",
            "--auth-supernode-private-key", str(self.certs / (key or site)),
            "--node-config", f'data-path="{data}" site-id="{site}"',
            "--port", str(free_port()), "--max-retries", "2", "--max-wait-time", "10",
            *(extra or ("--root-certificates", str(self.certs / "ca.crt"))))

    def online(self) -> int:
        out = self.cli("supernode", "list", "hospitals", "--format", "json").stdout
        return sum(node.get("status") == "online" for node in json.loads(out)["nodes"])

    def run(self, config: str) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", "run", str(REPO), "hospitals", "--stream",
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
        """Stop the process and its children (a SuperNode's flower-superexec outlives it)."""
        process = self.processes.pop(name)
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


@pytest.fixture()
def deployment(tmp_path):
    running = Deployment(tmp_path)
    yield running
    running.stop_all()


def run_config(model: str, out: Path, name: str, **extra) -> str:
    values = {"model.name": f'"{model}"', "output-dir": f'"{out}"', "run-name": f'"{name}"',
              "clients-per-round": 2, "local-steps": 2, "batch-size": 32,
              "physical-batch-size": 16, "learning-rate": 0.5, **extra}
    return " ".join(f"{k}={v}" for k, v in values.items())


def test_two_hospitals_train_over_tls_with_authenticated_supernodes(
        deployment, tiny_bert, tmp_path):
    deployment.two_hospitals_online()
    out = deployment.run(run_config(tiny_bert, tmp_path / "runs", "deploy",
                                    **{"num-server-rounds": 1}))
    assert deployment.statuses() == ["finished:completed"], out.stdout[-3000:]
    folder = tmp_path / "runs" / "deploy"
    report = json.loads((folder / "privacy_report.json").read_text())
    assert report["secure_noise"] is True and report["randomness"] == {
        "site-a": "fresh", "site-b": "fresh"}
    assert 0 < report["sample"]["epsilon_rdp_max"] <= 8.0
    model, _, _ = load_final_model(folder)  # base + adapter via PeftModel.from_pretrained
    assert any(".lora_B." in n for n, _ in model.named_parameters())
    # Each site kept its own ledger (the SuperNodes' FLWR_HOME): two datasets charged.
    ledger = Path(deployment.env["FLWR_HOME"]) / "fed-dplora" / "site-ledger.json"
    assert len(json.loads(ledger.read_text())) == 2


def test_unregistered_and_plain_supernodes_and_a_foreign_ca_are_refused(deployment):
    deployment.superlink()
    stranger = deployment.supernode("site-a", key="stranger", name="stranger")
    plain = deployment.supernode("site-a", "--insecure", name="plain")
    deployment.register("site-b")
    other_ca = write_trial_certs(deployment.tmp / "other", ["z"])
    foreign = deployment.supernode("site-b", "--root-certificates", str(other_ca / "ca.crt"),
                                   name="foreign")
    for process in (stranger, plain, foreign):
        assert process.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in deployment.log("stranger")
    assert "No SuperNode found with the given public key" in deployment.log("superlink")
    assert "requires a secure TLS connection" in deployment.log("plain")
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.log("foreign")
    assert deployment.online() == 0


def test_a_site_that_leaves_costs_rounds_not_the_run_and_rejoins(
        deployment, tiny_bert, tmp_path):
    deployment.two_hospitals_online()
    # A seeded coordinator (privacy.secure-noise=false) shows participation in its
    # metrics; each deployed site still draws fresh randomness itself.
    config = run_config(tiny_bert, tmp_path / "runs", "dropout", **{
        "num-server-rounds": 4, "min-replies": 1, "round-timeout": 60,
        "privacy.secure-noise": "false", "privacy.target-epsilon": 30.0})
    run = subprocess.Popen(["flwr", "run", str(REPO), "hospitals", "--stream",
                            "--run-config", config], env=deployment.env, cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "runs" / "dropout"
    rounds = lambda: len(read_metrics(folder)) if (folder / "metrics.jsonl").exists() else 0
    deployment.wait_for(lambda: rounds() >= 1, "round 1", 300)
    deployment.stop("site-b")
    deployment.wait_for(lambda: rounds() >= 2, "round 2", 300)
    deployment.supernode("site-b", name="site-b-again")
    assert run.wait(timeout=600) == 0
    assert deployment.statuses() == ["finished:completed"]
    rows = read_metrics(folder)
    assert rows[0]["replies"] == 2 and not rows[0]["lost"]
    assert "Node Unavailable" in rows[1]["failures"]["train"]["site-b"]
    assert rows[1]["replies"] == 1 and not rows[1]["lost"]
    assert rows[-1]["replies"] == 2  # rejoined: with node auth its node id follows its key
    report = json.loads((folder / "privacy_report.json").read_text())
    # site-b was charged for round 2 (asked, then failed), not for rounds it was gone.
    assert report["sample"]["epsilon_rdp"]["site-b"] <= report["sample"]["epsilon_rdp"][
        "site-a"]


def test_a_superlink_certificate_for_another_address_is_refused(tmp_path):
    """The CA is right, but the certificate names superlink.example.org, not 127.0.0.1."""
    elsewhere = Deployment(tmp_path, loopback=False)
    try:
        elsewhere.superlink(wait=False)
        time.sleep(5)
        node = elsewhere.supernode("site-a")
        assert node.wait(timeout=120) != 0
        assert "CERTIFICATE_VERIFY_FAILED" in elsewhere.log("site-a")
    finally:
        elsewhere.stop_all()
