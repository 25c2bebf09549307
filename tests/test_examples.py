"""Every script in examples/ runs to the end with --tiny (each in a fresh process, in an empty folder)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def test_examples_are_found():
    assert {"own_dataset_folder.py", "own_dataset_arrays.py"} <= {path.name for path in EXAMPLES}


@pytest.mark.parametrize("script", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs_tiny(script, tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(script), "--tiny"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (
        f"{script.name} --tiny exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
