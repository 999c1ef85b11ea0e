"""Small helpers several test modules share (no test module imports another)."""

from __future__ import annotations

from pathlib import Path

from experiments.deployment_lab import write_site_csv
from fed_dplora.data.demo import LABELS
from server.federation import Federation


def deployed_nodes(folder: Path, count: int, model: str, **extra) -> list[dict]:
    """Node configs of `count` deployed sites, each declaring its own data file and
    allowing `model`."""
    return [{"data-path": str(write_site_csv(folder / f"site-{i}.csv", i)),
             "site-id": f"partition-{i}", "labels": ",".join(LABELS), "models": model,
             **extra}
            for i in range(count)]


class Crash(BaseException):
    """Stands in for SIGKILL: nothing after it runs, the files stay as they are."""


def crash_at(monkeypatch, method: str, rnd: int) -> None:
    original = getattr(Federation, method)

    def crashing(self, *args, **kwargs):
        if self.state.pending and self.state.pending["round"] == rnd:
            raise Crash(method)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(Federation, method, crashing)


class NodesOnly:
    """The part of a Grid that a strategy's `configure_train` / `configure_evaluate` use."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes
