"""The documentation site builds without a warning: ``mkdocs build --strict`` (API reference and README guide).

Skipped when mkdocs or mkdocstrings is not installed (both come with ``pip install -e ".[dev]"``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python")),
    reason='needs mkdocs and mkdocstrings[python]: pip install -e ".[dev]"',
)
def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    pages = {path.relative_to(site).parent.as_posix() for path in site.rglob("index.html")}
    assert {".", "readme", "api/algorithms", "api/sampler", "api/transference"} <= pages, sorted(pages)
    sampler = (site / "api" / "sampler" / "index.html").read_text(encoding="utf-8")
    assert "MixtureSampler" in sampler and ":class:" not in sampler  # rendered from docstrings, Sphinx roles as code
    assert (site / "benchmarks" / "results_cpu.png").is_file()  # the README's image came along
