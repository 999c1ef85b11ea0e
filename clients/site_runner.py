"""The site runner: a hospital runs the ClientApp it installed, never the coordinator's.

A SuperNode started with `--isolation process --superexec-auth-secret-file SECRET`
runs no ClientApp itself: it queues each task on its Runtime API (loopback by default)
and waits for a process to take it. This runner is that process. It acquires each task
with a request signed by the shared secret (no other process can take a task), pulls
the message and context as Flower's `flwr-clientapp` does, checks the coordinator's
bundle (`clients.bundle_check`: refused, with the reason in this site's log, when it
would change what runs here), and calls the installed `clients.client_app.app`; the
bundle is never installed or imported. Tasks run one at a time, in this process, so a
site's model and data stay loaded across rounds. So one task must never hold up the
next: a task revoked while it runs (its run ended, its token expired) stops at its next
training step and fails alone, where Flower's task client would end the process (a
SIGINT, or a BaseException), and a message whose download stops (`--stall-timeout`) is
given up, where Flower's pull waits up to 2 hours.

    fed-dplora-site run --runtime-api 127.0.0.1:9094 --superexec-auth-secret-file SECRET
    fed-dplora-site digest     # the installed release's digest, to compare and pin

Uses Flower's internal Runtime API (flwr 1.42, pinned in pyproject.toml).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

import httpx
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError
from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor,
                                         RuntimeVersionHttpInterceptor,
                                         SuperExecAuthHttpInterceptor)
from flwr.supercore.retry import RetryInvoker, make_simple_http_retry_invoker
from flwr.supercore.run import InvalidRunStatusException, RunNotRunningException
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (pull_task_input, push_message,
                                                  push_task_output)

from clients import runtime
from clients.bundle_check import BundleRefused, check_bundle, installed_digest

log = logging.getLogger("fed_dplora.site")
POLL_S = 1.0
ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
RUN_ENDED = (RunNotRunningException, InvalidRunStatusException)  # BaseExceptions in flwr
TASK_REVOKED = (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN)  # token gone, run ended
STALL_S = 120.0  # default: a message's download with no new part for this long is given up


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run" and not args.superexec_auth_secret_file:
        parser.error("run needs --superexec-auth-secret-file (the SuperNode's own)")
    if not args.stall_timeout > 0:
        parser.error(f"--stall-timeout {args.stall_timeout:g}: give positive seconds "
                     f"(default {STALL_S:g})")
    _configure_logging()
    digest = installed_digest()
    if args.command == "digest":
        print(digest)  # the command's output, not a log line
        return
    if args.expect_digest and args.expect_digest != digest:
        sys.exit(f"the installed fed-dplora has digest {digest}, not the pinned "
                 f"{args.expect_digest}: reinstall the reviewed release")
    secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
    log.info("site runner: installed fed-dplora %s, Runtime API %s", digest,
             args.runtime_api)
    serve(args.runtime_api, secret, args.root_certificates, args.stall_timeout)


def serve(address: str, secret: bytes, root_certificates: str | None = None,
          stall_s: float = STALL_S) -> None:
    """Acquire and run this SuperNode's ClientApp tasks, one at a time, for ever."""
    tasks = _client(address, root_certificates, [
        RuntimeVersionHttpInterceptor(component_name="SuperExec"),
        SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE})])
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    while True:
        acquired = tasks.AcquireTask(request)
        if acquired.HasField("task") and acquired.token:
            run_task(address, acquired.token, root_certificates, stall_s)
        else:
            time.sleep(POLL_S)


def run_task(address: str, token: str, root_certificates: str | None = None,
             stall_s: float = STALL_S) -> None:
    """One task: pull it, check the bundle, run the installed ClientApp, push the reply.
    A refused bundle or a raising ClientApp is an error reply, as Flower sends one. A
    task whose input cannot be pulled is left to expire: its heartbeat stops and the
    SuperNode replies for it that the ClientApp stopped responding."""
    client = _client(address, root_certificates, [
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
        RuntimeTokenHttpInterceptor(token)], _task_retry_invoker())
    runtime.begin_task()
    heartbeat = HeartbeatSender(_heartbeat(client))
    heartbeat.start()
    try:
        try:
            message, context, run, fab = pull_task_input(StallGuard(client, stall_s))
        except (Exception, *RUN_ENDED):
            log.exception("this SuperNode's task could not be pulled; left to expire")
            return
        _answer(client, message, context, fab.content, run.run_id)
    finally:
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()


def _answer(client: RuntimeHttpClient, message: Message, context: Context, fab: bytes,
            run_id: int) -> None:
    """Run the task and push its reply, then its final status."""
    status, details = SubStatus.FAILED, "the site runner could not push its reply"
    try:
        reply, *outcome = _reply(message, context, fab, run_id)
        push_message(client, reply, context)
        status, details = outcome
    except (Exception, *RUN_ENDED):  # the task fails; the runner goes on with the next
        log.exception("task of this SuperNode failed before its reply was pushed")
    finally:
        push_task_output(client, context, status, details)  # logs an HTTP error itself


class StallGuard:
    """A task's Runtime API client whose message download gives up once no part of it
    has arrived for `stall_s`. A SuperNode that drops a message while downloading it
    (its run ended while the SuperLink was away) keeps the task open and the parts never
    come: Flower's pull would wait up to 2 hours, every later task queued behind it."""

    def __init__(self, client: RuntimeHttpClient, stall_s: float) -> None:
        self._client, self._stall_s, self._progress = client, stall_s, time.monotonic()

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def PullObject(self, request: PullObjectRequest) -> PullObjectResponse:  # noqa: N802
        response = self._client.PullObject(request)
        if response.object_available:
            self._progress = time.monotonic()
        elif time.monotonic() - self._progress > self._stall_s:
            raise ObjectPullError(request.object_id,
                                  f"no part of the message arrived for {self._stall_s:g} s")
        return response


def _task_retry_invoker() -> RetryInvoker:
    """Flower's Runtime API retries, but a revoked task (401: its token is gone; 403: its
    run ended) raises an `httpx.HTTPStatusError` instead of interrupting the process."""
    invoker = make_simple_http_retry_invoker()
    flower_gives_up = invoker.should_giveup

    def gives_up(exc: Exception) -> bool:
        if (isinstance(exc, httpx.HTTPStatusError)
                and exc.response.status_code in TASK_REVOKED):
            return True
        return flower_gives_up(exc)

    invoker.should_giveup = gives_up
    return invoker


def _heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """A task's heartbeat that never raises and never signals: when the SuperNode no
    longer acknowledges the task (its run ended, `flwr stop`) it revokes the task
    (`runtime.revoke_task`), whose training stops at its next step, and this runner
    lives on."""
    request, warned = SendTaskHeartbeatRequest(), False

    def beat() -> bool:
        nonlocal warned
        try:
            acknowledged = client.SendTaskHeartbeat(request).success
        except httpx.HTTPError:
            return False  # HeartbeatSender retries, with backoff, until the task ends
        if not acknowledged and not warned:
            warned = True
            runtime.revoke_task()
            log.warning("the SuperNode no longer acknowledges this task (its run ended): "
                        "its work stops at its next step")
        return True

    return beat


def _reply(message: Message, context: Context, fab: bytes, run_id: int
           ) -> tuple[Message, str, str]:
    """(reply, task status, details) for one message of run `run_id`."""
    try:
        check_bundle(fab)
    except BundleRefused as why:
        log.error("run %d refused: %s", run_id, why)
        return _error(message, f"refused by the site: {why}")
    from clients.client_app import app  # installed, never the bundle's
    try:
        return app(message=message, context=context), SubStatus.COMPLETED, ""
    except Exception as exc:
        log.exception("run %d: the ClientApp raised", run_id)
        return _error(message, f"{type(exc)}:<'{exc}'>")  # as flwr-clientapp reports it


def _error(message: Message, reason: str) -> tuple[Message, str, str]:
    error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason)
    return Message(error, reply_to=message), SubStatus.FAILED, reason


def _configure_logging() -> None:
    """fed-dplora's loggers to stderr (the site's log); Flower logs through its own."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("fed_dplora")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per Runtime API call


def _client(address: str, root_certificates: str | None, interceptors: list,
            retry_invoker: RetryInvoker | None = None) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=root_certificates is None,
        root_certificates=root_certificates, interceptors=interceptors,
        retry_invoker=retry_invoker or make_simple_http_retry_invoker())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fed-dplora-site", description="Run this site's installed fed-dplora ClientApp "
        "for a SuperNode started with --isolation process")
    parser.add_argument("command", choices=["run", "digest"])
    parser.add_argument("--runtime-api", default="127.0.0.1:9094",
                        help="the SuperNode's Runtime API (its --host:--port)")
    parser.add_argument("--superexec-auth-secret-file",
                        help="the same secret file the SuperNode was given (required to run)")
    parser.add_argument("--root-certificates",
                        help="CA of the Runtime API's TLS certificate, if it has one")
    parser.add_argument("--expect-digest",
                        help="refuse to start unless the installed release has this digest")
    parser.add_argument("--stall-timeout", type=float, default=STALL_S, metavar="SECONDS",
                        help="give a message's download up after this long without a new "
                        f"part (default {STALL_S:g}; raise it on a link slower than a few "
                        "Mbit/s: parts are up to 5 MB)")
    return parser


if __name__ == "__main__":
    main()
