"""A coordinator that ships code: app bundles that name another ClientApp, modify
fed_dplora or clients, or add a package that shadows an installed one. Against a
real SuperNode with the site runner each is refused (reason in the site's log) and
none of its code runs; against a stock SuperNode (the control) the same code runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from clients.bundle_check import BundleRefused, check_bundle, installed_digest
from experiments.deployment_lab import Deployment
from flwr_cli import REPO

COPIED = shutil.ignore_patterns(".git", "runs", "__pycache__", "*.fab",
                                ".import_linter_cache", ".pytest_cache")


def marker_code(marker: Path) -> str:
    return f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"


def hostile_bundle(folder: Path, attack: str, marker: Path) -> Path:
    """A copy of this project with one attack in it."""
    app = folder / f"app-{attack}"
    shutil.copytree(REPO, app, ignore=COPIED)
    if attack == "other-client-app":
        pyproject = app / "pyproject.toml"
        pyproject.write_text(pyproject.read_text().replace(
            'clientapp = "clients.client_app:app"', 'clientapp = "evil_app:app"'))
        (app / "evil_app.py").write_text(
            marker_code(marker) + "from flwr.clientapp import ClientApp\napp = ClientApp()\n")
    elif attack == "modified-client":
        with (app / "clients" / "client_app.py").open("a") as handle:
            handle.write(marker_code(marker))
    elif attack == "shadowing-package":
        (app / "opacus").mkdir()
        (app / "opacus" / "__init__.py").write_text(marker_code(marker))
    return app


def run_config(tiny_bert: str, out: Path) -> str:
    return (f'model.name="{tiny_bert}" output-dir="{out}" clients-per-round=1 '
            'num-server-rounds=1 local-steps=1 batch-size=32 physical-batch-size=16 '
            'round-timeout=120')


@pytest.fixture()
def one_hospital(tmp_path, tiny_bert):
    running = Deployment(tmp_path, models=tiny_bert)
    yield running
    running.stop_all()


ATTACKS = {"other-client-app": "names ClientApp 'evil_app:app'",
           "modified-client": "differ from this site's installed release",
           "shadowing-package": "outside fed-dplora's packages (['opacus'])"}


@pytest.mark.deployment
def test_a_site_runner_refuses_every_hostile_bundle_and_runs_none_of_its_code(
        one_hospital, tiny_bert, tmp_path):
    """Only the SuperNode's secret acquires its tasks; the genuine bundle passes the
    check and its run completes; each hostile one is refused for its own reason and
    none of its code runs (the stock control below shows it would). Mutants killed:
    the bundle check skipped, or each of its checks removed; every bundle refused."""
    one_hospital.superlink()
    one_hospital.register("site-a")
    one_hospital.supernode("site-a")
    one_hospital.wait_for(lambda: one_hospital.online() == 1, "the SuperNode")
    runtime_api = one_hospital.runtime_apis["site-a"]
    assert acquires_a_task(runtime_api, (tmp_path / "site-a.secret").read_bytes())
    assert not acquires_a_task(runtime_api, b"not the secret")
    one_hospital.run(run_config(tiny_bert, tmp_path / "runs"))  # the release it installed
    assert one_hospital.statuses() == ["finished:completed"], one_hospital.log("site-a.runner")
    for attack, reason in ATTACKS.items():
        marker = tmp_path / f"{attack}.ran"
        one_hospital.run(run_config(tiny_bert, tmp_path / "runs"),
                         hostile_bundle(tmp_path, attack, marker))
        assert not marker.exists(), attack
        refusals = [line for line in one_hospital.log("site-a.runner").splitlines()
                    if "refused: the bundle" in line]
        assert any(reason in line for line in refusals), attack
    refused = ["finished:failed"] * len(ATTACKS)
    assert sorted(one_hospital.statuses()) == ["finished:completed", *refused]


def acquires_a_task(address: str, secret: bytes) -> bool:
    """Whether a process holding `secret` may ask this SuperNode for its tasks."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[SuperExecAuthHttpInterceptor(
            master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"})])
    try:
        client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
        return True
    except Exception:  # refused: the request is not signed with the SuperNode's secret
        return False
    finally:
        client.close()


@pytest.mark.deployment
def test_control_a_stock_supernode_runs_the_coordinators_code(
        one_hospital, tiny_bert, tmp_path):
    """Without the site runner, the modified ClientApp and the shadowing package run."""
    one_hospital.superlink()
    one_hospital.register("site-a")
    one_hospital.supernode("site-a", stock=True)
    one_hospital.wait_for(lambda: one_hospital.online() == 1, "the SuperNode")
    for attack in ("modified-client", "shadowing-package"):
        marker = tmp_path / f"{attack}.ran"
        one_hospital.run(run_config(tiny_bert, tmp_path / "runs"),
                         hostile_bundle(tmp_path, attack, marker))
        one_hospital.wait_for(marker.exists, f"{attack} to run at the site", 120)


def test_the_genuine_bundle_is_lean_passes_and_its_digest_is_the_installed_one(tmp_path):
    subprocess.run(["flwr", "build", "--app", str(REPO)], cwd=tmp_path, check=True,
                   capture_output=True, env={**os.environ, "FLWR_HOME": str(tmp_path / "h")})
    (fab,) = tmp_path.glob("*.fab")
    with zipfile.ZipFile(fab) as bundle:
        tops = {name.split("/")[0] for name in bundle.namelist()}
    assert tops <= {"fed_dplora", "clients", "strategies", "server", "pyproject.toml",
                    "README.md", ".info"}, tops  # no studies, docs, tests or caches
    assert fab.stat().st_size < 1_000_000  # 3.3 MB with the studies; 0.33 MB now
    assert check_bundle(fab.read_bytes()) == installed_digest()
    with pytest.raises(BundleRefused):
        check_bundle(b"not a zip")
