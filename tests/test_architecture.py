"""The layer contracts in pyproject.toml ([tool.importlinter]) hold."""

import shutil
import subprocess
from pathlib import Path


def test_import_contracts_are_kept():
    linter = shutil.which("lint-imports")
    assert linter, "import-linter is a test dependency: pip install -e '.[test]'"
    proc = subprocess.run([linter], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 kept, 0 broken" in proc.stdout
