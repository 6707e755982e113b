"""The notebook-style example in docs/ runs from start to end."""

import subprocess
import sys

from conftest import REPO


def test_docs_example_runs():
    r = subprocess.run([sys.executable, str(REPO / "docs" / "python_example.py")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "AlphaFold: mean pLDDT" in r.stdout
