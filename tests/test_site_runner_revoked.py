"""A task the SuperNode revokes or drops while the site runner runs it.

Revoked: the SuperNode stops acknowledging the task's heartbeat and answers 401 (its
token expired) or 403 (its run ended); Flower's task client then ends its process (a
SIGINT, or a BaseException). Dropped: a SuperNode whose run ended while it was
downloading the message keeps the task open, and the message's parts never arrive;
Flower's pull waits up to 2 hours. Either fits one process per task. The site runner
serves every run in one process, one task at a time, so the task must fail alone and
the runner go on, or the SuperNode waits for ever on the next run's task: a SuperLink
killed mid-run and restarted hung the resumed run's census that way (CI, 2026-12-03)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from flwr.proto.message_pb2 import Message, ObjectTree, PullObjectResponse
from flwr.proto.runtime_pb2 import (PullAppMessagesResponse, PullTaskInputResponse,
                                    PushTaskOutputResponse, SendTaskHeartbeatResponse)

from experiments.flwr_job import free_port

RUN_TASK = ("import logging, sys; logging.basicConfig(); import clients.site_runner as r; "
            "r.run_task(sys.argv[1], 'a-task-token', stall_s=2.0); "
            "print('the runner goes on')")
REFUSED = b'{"detail": "task revoked"}'
DROPPED = {"pull-task-input": PullTaskInputResponse(),
           "pull-messages": PullAppMessagesResponse(
               messages_list=[Message()], message_object_trees=[ObjectTree(object_id="ab")]),
           "pull-object": PullObjectResponse(object_found=True, object_available=False)}


class SuperNodeRuntimeApi(BaseHTTPRequestHandler):
    """A SuperNode's Runtime API for one task: `status` answers every call to pull it
    (401 or 403 revoke it; 200 serves the parts of a message it has dropped), the task's
    heartbeat `acknowledged` or not."""
    status, acknowledged = 403, False
    calls: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        name = self.path.rsplit("/", 1)[-1]
        self.calls.append(name)
        if name == "send-task-heartbeat":
            self._answer(200, SendTaskHeartbeatResponse(success=self.acknowledged))
        elif name == "push-task-output":
            self._answer(200, PushTaskOutputResponse())
        elif self.status != 200:  # after the first heartbeat has come back
            time.sleep(1.0)
            self._answer(self.status, REFUSED)
        else:
            self._answer(200, DROPPED[name])

    def _answer(self, status: int, body) -> None:
        content = body if isinstance(body, bytes) else body.SerializeToString()
        self.send_response(status)
        self.send_header("content-length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, *args) -> None:
        pass


def run_one_task(status: int, acknowledged: bool) -> subprocess.CompletedProcess:
    SuperNodeRuntimeApi.status, SuperNodeRuntimeApi.acknowledged = status, acknowledged
    SuperNodeRuntimeApi.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), SuperNodeRuntimeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return subprocess.run(
            [sys.executable, "-c", RUN_TASK, f"127.0.0.1:{server.server_port}"],
            capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()


@pytest.mark.parametrize("status, acknowledged", [(401, True), (403, True), (403, False)],
                         ids=["token-expired", "run-ended", "heartbeat-refused"])
def test_a_revoked_task_fails_alone_and_the_site_runner_goes_on(status, acknowledged):
    out = run_one_task(status, acknowledged)
    assert out.returncode == 0 and "the runner goes on" in out.stdout, out.stderr[-3000:]
    assert ("no longer acknowledges this task" in out.stderr) is not acknowledged
    assert "task could not be pulled; left to expire" in out.stderr
    # No final status: the SuperNode's reply for a task that expires is "ClientApp
    # stopped responding"; a FAILED status without a reply would leave it waiting.
    assert "push-task-output" not in SuperNodeRuntimeApi.calls


def test_a_message_the_supernode_dropped_is_given_up_once_its_parts_stop_coming():
    started = time.monotonic()
    out = run_one_task(200, True)
    assert out.returncode == 0 and "the runner goes on" in out.stdout, out.stderr[-3000:]
    assert "no part of the message arrived for 2 s" in out.stderr
    assert time.monotonic() - started < 60  # Flower's own pull: up to 2 hours
    assert SuperNodeRuntimeApi.calls.count("pull-object") >= 2  # it did wait for them
    assert "push-task-output" not in SuperNodeRuntimeApi.calls


def test_a_stall_timeout_that_is_not_positive_is_refused_by_name():
    out = subprocess.run([sys.executable, "-m", "clients.site_runner", "run",
                          "--superexec-auth-secret-file", "unused", "--stall-timeout", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--stall-timeout 0: give positive seconds (default 120)" in out.stderr
