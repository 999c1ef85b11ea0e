"""Freed memory goes back to the OS: after each site message and each server round."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from experiments.bench_worker_memory import rss_mb
from fed_dplora.ops.memory import release_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="malloc_trim is glibc's (elsewhere a no-op)")
def test_freed_heap_memory_is_handed_back():
    """128 MB of 64 KB blocks (on the heap, below glibc's mmap threshold), all freed but
    the last, which pins the heap's top: only a trim hands the rest back."""
    blocks = [bytearray(64 * 1024) for _ in range(2000)]
    last = blocks[-1]
    del blocks
    before = rss_mb()
    assert release_freed_memory()
    assert rss_mb() < before - 64, (before, rss_mb())
    assert len(last) == 64 * 1024


def test_every_site_message_hands_memory_back_even_when_it_fails(monkeypatch):
    from clients import client_app
    calls = []
    monkeypatch.setattr(client_app, "release_freed_memory", lambda: calls.append(1))
    context = SimpleNamespace(node_config={})
    assert client_app._site_errors(lambda msg, ctx: "reply")(None, context) == "reply"
    with pytest.raises((ZeroDivisionError, RuntimeError)):
        client_app._site_errors(lambda msg, ctx: 1 / 0)(None, context)
    assert calls == [1, 1]


def test_the_server_hands_memory_back_after_every_round(monkeypatch, tmp_path):
    from server import federation
    calls, rounds = [], []
    fake = SimpleNamespace(state=SimpleNamespace(round=0), run=SimpleNamespace(path=tmp_path),
                           evaluate_base=lambda: None, finish=lambda started: None,
                           run_round=lambda rnd: rounds.append(rnd) or True)
    monkeypatch.setattr(federation.Federation, "set_up", classmethod(lambda cls, *a: fake))
    monkeypatch.setattr(federation, "release_freed_memory", lambda: calls.append(len(rounds)))
    federation.run_federation(None, SimpleNamespace(run_id=1),
                              SimpleNamespace(num_server_rounds=3), True, None, 0.0)
    assert rounds == [1, 2, 3] and calls == [1, 2, 3]  # one trim after each round
