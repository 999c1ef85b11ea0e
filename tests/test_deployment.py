"""Cross-silo deployment on 127.0.0.1, as docs/deployment.md describes it: a SuperLink with
TLS and SuperNode authentication, registered SuperNodes each with its own data file and
site runner, `flwr run` against the SuperLink; refused SuperNodes; a site that leaves
and rejoins."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from experiments.deployment_lab import Deployment
from fed_dplora.run.results import load_final_model, read_metrics
from fed_dplora.ops.trial_certs import write_trial_certs
from flwr_cli import REPO

pytestmark = pytest.mark.deployment


@pytest.fixture()
def deployment(tmp_path, tiny_bert):
    running = Deployment(tmp_path, models=tiny_bert)
    yield running
    running.stop_all()


def run_config(model: str, out: Path, name: str, **extra) -> str:
    values = {"model.name": f'"{model}"', "output-dir": f'"{out}"', "run-name": f'"{name}"',
              "clients-per-round": 2, "local-steps": 2, "batch-size": 32,
              "physical-batch-size": 16, "learning-rate": 0.5, **extra}
    return " ".join(f"{k}={v}" for k, v in values.items())


def test_two_hospitals_train_over_tls_with_authenticated_supernodes(
        deployment, tiny_bert, tmp_path):
    deployment.hospitals_online()
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
    assert len(json.loads(ledger.read_text())["accounts"]) == 2


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
    # Sites that agreed to this study's loose budget (their defaults, 16 lifetime and
    # 10 per run, would decline its rounds past replace-one epsilon 10).
    limits = {"max-epsilon": 100, "max-run-epsilon": 100}
    deployment.hospitals_online(**limits)
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
    deployment.supernode("site-b", name="site-b-again", **limits)
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
