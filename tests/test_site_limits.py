"""What any message may cost a deployed site, tried as a hostile coordinator would
(issue 48): consent for weak noise, a default budget, work caps, a stop that ends the
work, charges only for real releases, and the small holes (model allow-list, the hub,
a zip bomb, the published checkpoint, an appended row).

Each test names the mutant (the fix removed) it kills.
"""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path

import dp_accounting as dpa
import huggingface_hub.constants
import pytest
from helpers import Crash
from hostile import (HostileCoordinator, charged_steps, site,  # noqa: F401
                     spent_runs, train_with_labels)

import fed_dplora.site.ledger as ledger_module
from clients import bundle_check, client_app, local_site, runtime, site_runner
from clients.bundle_check import BundleRefused, check_bundle
from fed_dplora.config.specs import DEFAULT_MODEL
from fed_dplora.data.site import DataSource
from fed_dplora.site.ledger import RoundAsk, SiteDeclines, SiteLedger
from fed_dplora.site.limits import MAX_ACCOUNT_EVENTS, UNNOISED_BELOW, SiteLimits
from fed_dplora.site.trainer import LocalTrainer
from strategies import wire as p

SOURCE = DataSource("a" * 64, 300, "notes.csv")


def declined(reply) -> str:
    return reply.content[p.CONFIG][p.DECLINED]


def shares(site: dict) -> dict:
    """The site, sharing its reasons (a dp-only site says "declined" only)."""
    return {**site, "share-metrics": "evaluation"}


def test_weak_noise_at_a_default_site_is_declined_before_any_charge(monkeypatch, config,
                                                                     site):
    """sigma 1e-9, which a default site once trained at replace-one epsilon infinity.
    Mutant killed: the un-noised floor removed (then only the default limit declines
    it, with another reason)."""
    coordinator = HostileCoordinator(monkeypatch, shares(site), config)
    reply = coordinator.train(coordinator.global_arrays(), sigma=1e-9)
    assert "without sample-level DP noise" in declined(reply)
    assert spent_runs(Path(site["privacy-ledger"])) == 0


def test_allow_unnoised_alone_keeps_the_default_finite_budget(monkeypatch, config, site):
    """Consent to un-noised rounds without `max-epsilon=inf` trains none: a deployed
    site's default lifetime limit is finite. Mutant killed: no default `max-epsilon`."""
    coordinator = HostileCoordinator(monkeypatch, {**shares(site), "allow-unnoised": True},
                                     config)
    reply = coordinator.train(coordinator.global_arrays(), sigma=1e-9)
    assert "max-epsilon 16" in declined(reply)
    assert spent_runs(Path(site["privacy-ledger"])) == 0
    with pytest.raises(ValueError, match="max-epsilon=inf.*allow-unnoised=true"):
        runtime.site_limits({**site, "max-epsilon": float("inf")})


@pytest.mark.parametrize("key,value,cap", [("local-steps", 1_000_000, "max-local-steps"),
                                           ("batch-size", 5000, "max-batch-size")])
def test_work_past_a_cap_is_declined_before_any_charge(monkeypatch, config, site, key,
                                                       value, cap):
    """Mutant killed: the work caps not checked (1e6 steps were charged epsilon 2.78)."""
    coordinator = HostileCoordinator(monkeypatch, site, {**config, key: value})
    reply = coordinator.train(coordinator.global_arrays())
    assert cap in declined(reply) and "WorkRefused" in declined(reply)
    assert spent_runs(Path(site["privacy-ledger"])) == 0


def counting_steps(monkeypatch, after_each=None) -> list[int]:
    steps, real = [], LocalTrainer._logical_step

    def step(self, *args):
        steps.append(1)
        if after_each:
            after_each(len(steps))
        return real(self, *args)
    monkeypatch.setattr(LocalTrainer, "_logical_step", step)
    return steps


def test_a_revoked_task_stops_within_one_step_and_releases_nothing(monkeypatch, config,
                                                                   site):
    """The SuperNode stops acknowledging the task (`flwr stop`) after step 3 of 50.
    Mutant killed: the steps never call the stop check."""
    steps = counting_steps(monkeypatch, lambda n: n == 3 and runtime.revoke_task())
    runtime.begin_task()
    coordinator = HostileCoordinator(monkeypatch, shares(site), {**config, "local-steps": 50})
    reply = coordinator.train(coordinator.global_arrays())
    runtime.begin_task()
    assert len(steps) == 3 and "WorkStopped" in declined(reply)
    assert not reply.content.array_records  # nothing released
    assert spent_runs(Path(site["privacy-ledger"])) == 1  # charged before its first step


def test_a_task_past_its_wall_time_cap_stops(monkeypatch, config, site):
    """Mutant killed: `max-task-seconds` ignored by the stop check."""
    clock = [0.0]
    monkeypatch.setattr("fed_dplora.site.limits.time.monotonic", lambda: clock[0])
    steps = counting_steps(monkeypatch, lambda n: clock.__setitem__(0, 10.0 * n))
    coordinator = HostileCoordinator(monkeypatch, {**shares(site), "max-task-seconds": 25},
                                     {**config, "local-steps": 50})
    reply = coordinator.train(coordinator.global_arrays())
    assert len(steps) == 3 and "max-task-seconds=25" in declined(reply)


def test_the_site_runners_heartbeat_revokes_an_unacknowledged_task():
    """Mutant killed: the heartbeat only logs (the work ran on for days)."""
    class Unacknowledged:
        def SendTaskHeartbeat(self, request):  # noqa: N802
            return type("Reply", (), {"success": False})()
    runtime.begin_task()
    assert site_runner._heartbeat(Unacknowledged())() is True
    assert runtime.task_revoked()
    runtime.begin_task()
    assert not runtime.task_revoked()


def test_the_ledger_refuses_a_pathological_plan_without_computing_it(monkeypatch, tmp_path):
    """1e9 steps at sigma 1e4 once held the ledger's lock for over 200 s; and a
    coordinator varying sigma each round makes every round a new event. Mutant
    killed: the ledger's bounds removed (epsilon computed)."""
    def computed(*args, **kwargs):
        raise AssertionError("the ledger computed epsilon")
    monkeypatch.setattr(ledger_module, "pld_epsilon", computed)
    monkeypatch.setattr(ledger_module, "_rdp_total", computed)
    ledger = SiteLedger(tmp_path / "l.json", SiteLimits())
    with pytest.raises(SiteDeclines, match="more than the ledger accounts"):
        ledger.charge_or_decline(SOURCE, RoundAsk("r", 0.1, 1e4, 10**9))
    monkeypatch.undo()
    for i in range(MAX_ACCOUNT_EVENTS):
        ledger.charge_or_decline(SOURCE, RoundAsk("r", 0.1, 100.0 + i, 1))
    monkeypatch.setattr(ledger_module, "pld_epsilon", computed)
    with pytest.raises(SiteDeclines, match="distinct"):
        ledger.charge_or_decline(SOURCE, RoundAsk("r", 0.1, 500.0, 1))


def test_a_run_past_the_sites_max_rounds_is_declined(monkeypatch, config, site):
    """Mutant killed: the ledger does not count a run's rounds."""
    coordinator = HostileCoordinator(monkeypatch, {**shares(site), "max-rounds": 2}, config)
    arrays = coordinator.global_arrays()
    assert all(coordinator.train(arrays).content.array_records for _ in range(2))
    assert "max-rounds 2" in declined(coordinator.train(arrays))


def test_a_round_that_fails_before_its_first_step_is_not_charged(monkeypatch, config,
                                                                  site):
    """Label names other than the site's declared ones (declined while the data is
    prepared); a model off the allow-list. Mutant killed: the charge made before the
    model and data are ready."""
    coordinator = HostileCoordinator(monkeypatch, site, config)
    assert "leave out" in declined(train_with_labels(coordinator, ("nope", "none")))
    off_list = HostileCoordinator(monkeypatch, {**site, "models": DEFAULT_MODEL}, config)
    assert "allow-list" in declined(off_list.train(coordinator.global_arrays()))
    assert spent_runs(Path(site["privacy-ledger"])) == 0


# Where the site's process dies in a round, and whether its charge was written by then.
SITE_CRASHES = [(local_site, "prepare", False),  # model built, data being tokenized
                (LocalTrainer, "probe", False),  # the public probe's wiring checks
                (LocalTrainer, "_apply", True),  # the first noised step applied
                (client_app, "to_record", True)]  # the release being packed


@pytest.mark.parametrize("owner, name, charged", SITE_CRASHES,
                         ids=[name for _, name, _ in SITE_CRASHES])
def test_a_site_killed_mid_round_has_charged_exactly_what_it_could_have_released(
        monkeypatch, config, site, owner, name, charged):
    """The write-ahead charge: nothing before the first noised step, the whole round
    from it on, on disk whatever dies after. Mutants killed: the charge made before
    the data is prepared (the first two points), the charge made after training
    (the first noised step)."""
    coordinator = HostileCoordinator(monkeypatch, site, config)
    arrays = coordinator.global_arrays()

    def killed(*args, **kwargs):
        raise Crash(name)
    monkeypatch.setattr(owner, name, killed)
    with pytest.raises(Crash):
        coordinator.train(arrays)
    assert charged_steps(Path(site["privacy-ledger"])) == (
        [config["local-steps"]] if charged else [])


@pytest.mark.parametrize("name", ["/etc", "/no/such/folder", "bert-base-uncased"])
def test_a_model_off_the_allow_list_gets_one_refusal_whatever_the_path(monkeypatch,
                                                                       config, site, name):
    """The error type once told which paths exist. Mutant killed: no allow-list."""
    reply = HostileCoordinator(monkeypatch, site, {**config, "model.name": name}).census()
    assert reply.has_error()
    assert reply.error.reason.replace(name, "NAME") == (
        "RuntimeError(\"PublicRefusal: model.name='NAME' is not on this site's allow-list "
        "(its node config's models)\")")
    assert runtime.allowed_models({}) == (DEFAULT_MODEL,)


def test_a_deployed_site_keeps_the_hub_offline_unless_it_allows_it(monkeypatch, config,
                                                                   site):
    """Mutant killed: `HF_HUB_OFFLINE` not set at a deployed site."""
    for allow, offline in ((True, False), (False, True)):
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        HostileCoordinator(monkeypatch, {**site, "allow-hub": allow}, config).census()
        assert huggingface_hub.constants.HF_HUB_OFFLINE is offline
        assert (runtime.os.environ["HF_HUB_OFFLINE"] == "1") is offline


def bundle_with(big_name: str, size: int, client_app: str = bundle_check.CLIENT_APP
                ) -> bytes:
    """The installed release as a bundle, plus one member of `size` zero bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("pyproject.toml", "[tool.flwr.app.components]\n"
                        f'clientapp = "{client_app}"\n')
        for name, data in bundle_check._installed_files().items():
            bundle.writestr(name, data)
        with bundle.open(big_name, "w", force_zip64=True) as member:
            block = bytes(1 << 20)
            for _ in range(size >> 20):
                member.write(block)
    return buffer.getvalue()


def peak_bytes(check) -> int:
    tracemalloc.start()
    try:
        check()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_zip_bomb_is_refused_in_bounded_memory():
    """256 MB of zeros in a few hundred KB: refused on its header when the check would
    read it, never read when it would not. Mutants killed: no size cap (the member is
    read), every member read."""
    bomb = bundle_with("fed_dplora/bomb.py", 256 << 20)
    assert len(bomb) < 2 << 20

    def refused():
        with pytest.raises(BundleRefused, match="uncompressed"):
            check_bundle(bomb)
    assert peak_bytes(refused) < 64 << 20
    elsewhere = bundle_with("data/bomb.bin", 256 << 20, client_app="evil:app")

    def refused_for_its_client_app():
        with pytest.raises(BundleRefused, match="evil:app"):
            check_bundle(elsewhere)
    assert peak_bytes(refused_for_its_client_app) < 64 << 20


def test_an_appended_row_keeps_the_sites_ledger_account(monkeypatch, config, site):
    """Mutant killed: the account keyed by the file's content (a new row opened a
    fresh budget for every old record)."""
    coordinator = HostileCoordinator(monkeypatch, site, config)
    arrays = coordinator.global_arrays()
    coordinator.train(arrays)
    with open(site["data-path"], "a") as notes:
        notes.write("a new note written today,routine\n")
    from clients import client_app
    client_app._site.cache_clear()
    client_app._source.cache_clear()
    coordinator.train(arrays)
    accounts = SiteLedger(site["privacy-ledger"], SiteLimits()).accounts()
    assert len(accounts) == 1
    ((run, counts),) = next(iter(accounts.values()))["runs"].items()
    assert counts[ledger_module.ROUNDS] == 2


def test_the_unnoised_floor_is_a_weak_guarantee():
    """docs: one full-batch step at sigma `UNNOISED_BELOW` alone costs epsilon > 15 at
    delta 1e-5 (dp-accounting's PLD accountant)."""
    accountant = dpa.pld.PLDAccountant()
    accountant.compose(dpa.GaussianDpEvent(UNNOISED_BELOW))
    assert accountant.get_epsilon(1e-5) > 15
