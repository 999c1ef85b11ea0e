"""Apply each mutant to a temporary copy of the repository and check that its tests
then fail.

The heavy libraries are imported once here; each test run is a forked child that imports
the project from the copy (never from this tree), so a mutant costs its tests' time, not
torch's import. A mutant is killed when every test it names fails (in set-up or call);
one that survives, a test it names that no longer exists, and a mutant that no longer
applies are each a failed check. The named tests must pass on the unpatched copy first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .mutant import Mutant, StaleMutant, restore

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
PROJECT = ("fed_dplora", "clients", "strategies", "server", "experiments")
HEAVY = ("numpy", "torch", "transformers", "peft", "opacus", "datasets", "dp_accounting",
         "flwr", "pytest")


@dataclass(frozen=True)
class Verdict:
    mutant: str
    kills: tuple[str, ...]
    outcome: str  # "killed", "survived", "stale", "timeout"
    detail: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.outcome == "killed"


def copy_tree(destination: Path) -> Path:
    """The repository's tracked and untracked, not ignored files, copied."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def outcomes(root: Path, tests: tuple[str, ...], timeout_s: float,
             output: Path) -> dict[str, str] | None:
    """{test id: "passed" | "failed" | "skipped"} for `tests` run from `root` in a forked
    child (its output to `output`); None when they ran past `timeout_s`."""
    result = output.with_suffix(".json")
    result.write_text("")
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.setpgid(0, 0)
        code = 1
        try:
            with output.open("w") as sink:
                os.dup2(sink.fileno(), 1)
                os.dup2(sink.fileno(), 2)
            code = _run_in_child(root, tests, result)
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.2)
    return json.loads(result.read_text() or "{}")


def _run_in_child(root: Path, tests: tuple[str, ...], result: Path) -> int:
    """pytest on `tests` with the project imported from `root` (also for subprocesses)."""
    import pytest
    for name in [m for m in sys.modules if m.split(".")[0] in PROJECT
                 or str(REPO) in str(getattr(sys.modules[m], "__file__", "") or "")]:
        del sys.modules[name]
    sys.path[:] = [str(root), *(s for s in sys.path if not s.startswith(str(REPO)))]
    sys.dont_write_bytecode = True
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    os.chdir(root)
    recorder = _Recorder()
    pytest.main(["-q", "-p", "no:cacheprovider", "--no-header",
                 *(f"tests/{t}" for t in tests)], plugins=[recorder])
    result.write_text(json.dumps(recorder.outcomes))
    return 0


class _Recorder:
    """Each test's outcome: failed if any phase failed, else passed or skipped."""

    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}

    def pytest_runtest_logreport(self, report) -> None:
        name = report.nodeid.removeprefix("tests/")
        if report.failed:
            self.outcomes[name] = "failed"
        elif report.skipped:
            self.outcomes.setdefault(name, "skipped")
        elif report.when == "call":
            self.outcomes.setdefault(name, "passed")

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.outcomes[f"collect:{report.nodeid}"] = "failed"


def selected(found: dict[str, str], test: str) -> list[str]:
    """The outcomes of the items `test` names (itself, or its parameters)."""
    return [v for k, v in found.items() if k == test or k.startswith(test + "[")]


def all_were(found: dict[str, str], test: str, outcome: str) -> bool:
    """Whether `test` names at least one item and every one of them had `outcome`."""
    items = selected(found, test)
    return bool(items) and all(v == outcome for v in items)


def judge(mutant: Mutant, root: Path, timeout_s: float) -> Verdict:
    start = time.monotonic()
    try:
        originals = mutant.apply(root)
    except StaleMutant as why:
        return Verdict(mutant.name, mutant.kills, "stale", str(why), 0.0)
    output = root.parent / "output.log"
    try:
        found = outcomes(root, mutant.kills, timeout_s, output)
    finally:
        restore(originals)
    spent = time.monotonic() - start
    if found is None:
        return Verdict(mutant.name, mutant.kills, "timeout", f"past {timeout_s:g} s", spent)
    alive = [t for t in mutant.kills if not all_were(found, t, "failed")]
    if alive:
        tail = "\n".join(output.read_text().splitlines()[-15:])
        return Verdict(mutant.name, mutant.kills, "survived",
                       f"still pass: {alive}\n{tail}", spent)
    return Verdict(mutant.name, mutant.kills, "killed", "", spent)


def baseline_problems(root: Path, mutants: list[Mutant], timeout_s: float) -> list[str]:
    """The named tests that do not exist or do not pass on the unpatched copy."""
    tests = tuple(sorted({t for m in mutants for t in m.kills}))
    found = outcomes(root, tests, timeout_s, root.parent / "output.log")
    if found is None:
        return [f"the unpatched tests ran past {timeout_s:g} s"]
    return [f"{t}: {selected(found, t) or 'not found'}" for t in tests
            if not all_were(found, t, "passed")]


def run(mutants: list[Mutant], timeout_s: float = 600) -> tuple[list[str], list[Verdict]]:
    """(baseline problems, each mutant's verdict) on a fresh copy of the repository."""
    for module in HEAVY:
        __import__(module)
    with tempfile.TemporaryDirectory(prefix="mutants-") as folder:
        root = copy_tree(Path(folder) / "repo")
        problems = baseline_problems(root, mutants, timeout_s * 4)
        if problems:
            return problems, []
        verdicts = []
        for each in mutants:
            verdicts.append(judge(each, root, timeout_s))
            log.info("%-8s %s (%.0f s) %s", verdicts[-1].outcome, each.name,
                     verdicts[-1].seconds, verdicts[-1].detail)
        return [], verdicts
