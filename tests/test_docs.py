"""The documentation site builds without a warning: ``mkdocs build --strict`` (the README as the home page, the
guide, the API reference), with working links: the README into the guide, the guide into the API reference,
docstrings' Sphinx roles into the API reference.

Skipped when mkdocs or mkdocstrings is not installed (both come with ``pip install -e ".[dev]"``).
"""

from __future__ import annotations

import importlib.util
import re
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
    guide = {f"guide/{page.stem}" for page in (ROOT / "docs" / "guide").glob("*.md")}
    assert {".", "api/algorithms", "api/sampler", "api/transference", "examples", "benchmarks"} | guide <= pages, (
        sorted(pages)
    )
    # the home page is the README, its links lead into the guide
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "Quick start: the no-download demo" in home and 'href="guide/library/"' in home
    assert (site / "benchmarks" / "results_cpu.png").is_file()  # the results page's image came along
    # docstrings: Sphinx roles are gone, turned into links to the API entries (here, from one page to another)
    html = {page: (site / page / "index.html").read_text(encoding="utf-8") for page in pages}
    for page, text in html.items():
        assert not re.search(r":(?:class|func|meth|mod|attr|exc):`", text), f"{page}: a Sphinx role was not rendered"
    assert re.search(
        r'<a class="autorefs autorefs-internal"[^>]*href="\.\./episode/#kml\.data\.episode\.', html["api/sampler"]
    )
    # the guide links into the API reference by public name: [`kml.MAML`][kml.MAML]
    assert re.search(
        r'<a class="autorefs autorefs-internal"[^>]*href="\.\./\.\./api/[^"]+#kml\.[^"]*MAML"><code>kml\.MAML</code>',
        html["guide/library"],
    )
