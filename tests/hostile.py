"""A hostile coordinator's harness: crafted messages and run configs against the real
ClientApp of one deployed site, in process (tests/test_site_rule.py,
tests/test_site_limits.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Message, RecordDict
from helpers import deployed_nodes

from experiments import hostile_coordinator
from experiments.hostile_coordinator import (AS_DEPLOYED, FEDERATION_LABELS,  # noqa: F401
                                             head_bias)
from fed_dplora.site.ledger import ROUNDS, SiteLedger, SiteLimits
from strategies import wire as p
from strategies.round_config import client_config
from strategies.wire import to_record


class HostileCoordinator(hostile_coordinator.HostileCoordinator):
    """The experiments' hostile coordinator, this process a deployed site for the test."""

    def __init__(self, monkeypatch, node_config: dict, run_config: dict) -> None:
        for owner, name, value in AS_DEPLOYED:
            monkeypatch.setattr(owner, name, value)
        super().__init__(node_config, run_config)


def what_it_tells(reply: Message) -> tuple:
    """What a reply says besides its DP tensors: its kind, an error's text, a decline's
    reason, and which keys it carries."""
    if reply.has_error():
        return ("error", reply.error.reason)
    content = reply.content
    return ("reply", content.config_records.get(p.CONFIG, {}).get(p.DECLINED),
            sorted(content.array_records), sorted(content.metric_records))


def train_with_labels(coordinator: HostileCoordinator, names) -> Message:
    """A train message of the coordinator's global tensors that names `names` as the
    federation's labels (sigma 1)."""
    content = RecordDict({p.ARRAYS: to_record(coordinator.global_arrays()),
                          p.CONFIG: client_config(tuple(names), noise_multiplier=1.0)})
    return coordinator.send("train", content)


def charged_steps(ledger: Path) -> list[int]:
    """The steps charged to each run of each account of the site's ledger."""
    if not ledger.exists():
        return []
    return [sum(n for key, n in counts.items() if key != ROUNDS)
            for account in SiteLedger(ledger, SiteLimits()).accounts().values()
            for counts in account["runs"].values()]


def spent_runs(ledger: Path) -> int:
    return len(charged_steps(ledger))


@pytest.fixture()
def site(tmp_path, config) -> dict:
    """A deployed site's node config: its own notes (300 records), declared labels, its
    own ledger."""
    node = deployed_nodes(tmp_path, 1, config["model.name"])[0]
    from experiments.deployment_lab import write_site_csv
    node["data-path"] = str(write_site_csv(tmp_path / "notes.csv", 0, 300))
    node["privacy-ledger"] = str(tmp_path / "ledger.json")
    return node
