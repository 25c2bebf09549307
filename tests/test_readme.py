"""The README's Python code runs as written, and its data-free commands work.

Every ```python block of README.md is executed. Blocks are grouped by README section (``## `` heading):
the blocks of one section run in order in one shared namespace, like a session a reader types along
with; each section starts from a fresh namespace. Everything runs in a temporary folder (``data``,
``train_dir`` and any other relative path the README uses land there), on the CPU, with the synthetic
modes: the README's blocks are written to need no download. The one exception is learn2learn's own
benchmark loader, ``learn2learn.vision.benchmarks.get_tasksets``, which downloads its dataset: here it is
replaced by a learn2learn benchmark built the same way over kml's synthetic glyphs (the block runs
unchanged); that section is skipped when learn2learn is not installed, like the other ``l2l`` tests.
```bash blocks are not executed.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REQUIRE_L2L = os.environ.get("KML_REQUIRE_LEARN2LEARN", "") not in ("", "0") or os.environ.get("CI", "").lower() in (
    "1",
    "true",
)


def python_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(section heading, first line number of the code, code)`` of every ```python block, in order."""
    blocks, section, code, start = [], "(top)", None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if code is not None:
            if line.strip() == "```":
                blocks.append((section, start, "\n".join(code) + "\n"))
                code = None
            else:
                code.append(line)
        elif line.startswith("```python"):
            code, start = [], number + 1
        elif line.startswith("## "):
            section = line[3:].strip()
    assert code is None, f"README.md: the ```python block from line {start} is not closed"
    return blocks


def sessions() -> dict[str, list[tuple[int, str]]]:
    grouped: dict[str, list[tuple[int, str]]] = {}
    for section, start, code in python_blocks(README.read_text(encoding="utf-8")):
        grouped.setdefault(section, []).append((start, code))
    return grouped


SESSIONS = sessions()


def slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def test_readme_has_python_blocks():
    assert len(SESSIONS) >= 3, sorted(SESSIONS)  # the parser found the transference, data API and learn2learn code


def offline_get_tasksets(root: Path):
    """A stand-in for ``learn2learn.vision.benchmarks.get_tasksets``: the same kind of benchmark, no download.

    Omniglot-like: grey 28x28 synthetic glyphs, tasks drawn by learn2learn's transforms (N ways, K samples).
    """
    from kml.data.modes import load_stores
    from kml.integrations import learn2learn as integration

    l2l = integration.require_learn2learn()

    def get_tasksets(
        name,
        train_ways=5,
        train_samples=10,
        test_ways=5,
        test_samples=10,
        num_tasks=-1,
        root=None,
        device=None,
        **kwargs,
    ):
        def taskset(split: str, classes: int, ways: int, samples: int):
            store = load_stores(["glyphs"], split, root=data_root, side=28, channels=1)[0]
            return integration.taskset_from_store(store, ways, samples, classes, num_tasks)

        return l2l.vision.benchmarks.BenchmarkTasksets(
            taskset("train", 12, train_ways, train_samples),
            taskset("val", 6, test_ways, test_samples),
            taskset("test", 6, test_ways, test_samples),
        )

    data_root = root
    return get_tasksets


@pytest.mark.parametrize("section", list(SESSIONS), ids=[slug(s) for s in SESSIONS])
def test_readme_python_session_runs(section, tmp_path, monkeypatch):
    blocks = SESSIONS[section]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # "~/data" and the like stay inside the test's folder
    if any(re.search(r"^\s*import learn2learn\b", code, re.M) for _, code in blocks):
        from kml.errors import KMLError
        from kml.integrations import learn2learn as integration

        try:
            l2l = integration.require_learn2learn()
        except KMLError as error:
            if REQUIRE_L2L:
                pytest.fail(f"{error}; CI (or KML_REQUIRE_LEARN2LEARN=1) must run the README's learn2learn code")
            pytest.skip(str(error))
        monkeypatch.setattr(l2l.vision.benchmarks, "get_tasksets", offline_get_tasksets(tmp_path / "l2l-source"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    namespace: dict = {"__name__": "__readme__"}
    try:
        for start, code in blocks:
            tree = ast.parse(code, "README.md")
            ast.increment_lineno(tree, start - 1)  # a traceback names README.md and its line
            exec(compile(tree, "README.md", "exec"), namespace)
    finally:
        plt.close("all")


def run(*command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_download_script_help_and_one_line_error(tmp_path):
    # the root script the README documents (python download.py ...), run as a reader runs it
    done = run(sys.executable, str(ROOT / "download.py"), "--help", cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--datasets" in done.stdout and "--omniglot-side" in done.stdout
    bad = run(
        sys.executable, str(ROOT / "download.py"), "--on-corrupt", "ignore", "--root", str(tmp_path), cwd=tmp_path
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    assert "--on-corrupt" in bad.stderr and "python download.py --help" in bad.stderr
    assert not any(tmp_path.iterdir())


def test_kml_download_entry_point(tmp_path):
    from importlib.metadata import entry_points

    scripts = {entry.name: entry.value for entry in entry_points(group="console_scripts")}
    assert scripts.get("kml-download") == "kml.cli.download:main", (
        "the kml-download script is missing: pip install -e ."
    )
    script = Path(sys.executable).parent / "kml-download"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "kml.cli.download"]
    done = run(*command, "--help", cwd=tmp_path)
    assert done.returncode == 0 and "usage: kml-download" in done.stdout, done.stderr[-2000:]
    bad = run(*command, "--datasets", "omniglot", "--workers", "0", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --workers must be an integer >= 1, got 0", bad.stderr
    assert not any(tmp_path.iterdir())
