"""The mutant registry (tests/mutants): every test of a guarded file names a mutant, and
CI's groups are all killed (`python -m tests.mutants` runs every group)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from mutants import GROUPS

REPO = Path(__file__).resolve().parents[1]
GUARDED = {"test_site_rule.py": "site-rule", "test_site_limits.py": "site-limits",
           "test_secrecy.py": "secrecy", "test_hostile_coordinator.py": "coordinator",
           "test_site_ledger.py": "ledger", "test_site_runner.py": "site-runner",
           "test_site_runner_revoked.py": "site-runner", "test_hostile_site.py": "hostile-site",
           "test_attack_site.py": "attack"}
IN_CI = ("site-rule", "site-limits", "secrecy")


def functions_of(file: str) -> set[str]:
    """The file's test functions, less its controls (`test_control_*`: they show an
    attack works without the defence, and guard nothing themselves)."""
    tree = ast.parse((REPO / "tests" / file).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
            and node.name.startswith("test_") and not node.name.startswith("test_control_")}


@pytest.mark.parametrize("file,group", sorted(GUARDED.items()))
def test_every_test_of_a_guarded_file_is_named_by_a_mutant(file, group):
    named = {kill.split("::")[1].split("[")[0] for m in GROUPS[group] for kill in m.kills
             if kill.startswith(file + "::")}
    assert functions_of(file) - named == set()


def test_the_groups_ci_runs_have_every_mutant_killed():
    groups = [arg for group in IN_CI for arg in ("--group", group)]
    done = subprocess.run([sys.executable, "-m", "tests.mutants", *groups], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"{sum(len(GROUPS[g]) for g in IN_CI)} mutants: " in done.stderr
