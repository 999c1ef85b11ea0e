"""Client failures: one clear error naming the node and the phase, never a silent skip."""

from __future__ import annotations

from flwr.app import Message


class ClientFailure(RuntimeError):
    """A client failed, did not answer, or answered with tensors we must refuse."""


def checked_replies(replies: list[Message], expected: list[int], phase: str
                    ) -> list[Message]:
    """Every expected node answered without error; otherwise one clear error."""
    failed = [f"node {r.metadata.src_node_id}: {r.error.reason}"
              for r in replies if r.has_error()]
    if failed:
        raise ClientFailure(f"{phase}: {len(failed)} client(s) failed: " + "; ".join(failed))
    missing = sorted(set(expected) - {r.metadata.src_node_id for r in replies})
    if missing:
        raise ClientFailure(f"{phase}: no reply from node(s) {missing} before the timeout")
    return replies
