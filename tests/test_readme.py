"""The Python code of the README and of the guide runs as written, and their data-free commands work.

Every ```python block of README.md and of the guide pages (docs/guide/*.md) is executed, grouped into sessions:
in the README one session per section (``## `` heading), in the guide one session per page. The blocks of a
session run in order in one shared namespace, like a session a reader types along with; each session starts
from a fresh namespace. Everything runs in a temporary folder (``data``, ``train_dir`` and any other relative
path the pages use land there), on the CPU, with the synthetic modes: the blocks are written to need no
download. The one exception is learn2learn's own benchmark loader,
``learn2learn.vision.benchmarks.get_tasksets``, which downloads its dataset: here it is replaced by a
learn2learn benchmark built the same way over kml's synthetic glyphs (the block runs unchanged); a session
that imports learn2learn is skipped when learn2learn is not installed, like the other ``l2l`` tests.
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
GUIDE = ROOT / "docs" / "guide"
PAGES = [README, *sorted(GUIDE.glob("*.md"))]
REQUIRE_L2L = os.environ.get("KML_REQUIRE_LEARN2LEARN", "") not in ("", "0") or os.environ.get("CI", "").lower() in (
    "1",
    "true",
)


def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def fenced_blocks(text: str, page: str, language: str) -> list[tuple[str, int, str]]:
    """``(section heading, first line number of the code, code)`` of every ```language block, in order."""
    blocks, section, code, start = [], "(top)", None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if code is not None:
            if line.strip() == "```":
                blocks.append((section, start, "\n".join(code) + "\n"))
                code = None
            else:
                code.append(line)
        elif line.startswith("```" + language) and line[3 + len(language) :].strip() == "":
            code, start = [], number + 1
        elif line.startswith("```"):
            code, start = [], -1  # another language: skipped, but its lines are not headings
        elif line.startswith("## "):
            section = line[3:].strip()
    assert code is None, f"{page}: the ``` block from line {start} is not closed"
    return [block for block in blocks if block[1] > 0]


def python_blocks(text: str, page: str = "README.md") -> list[tuple[str, int, str]]:
    return fenced_blocks(text, page, "python")


def sessions() -> dict[str, tuple[Path, list[tuple[int, str]]]]:
    """Session name -> (page, its blocks): one per README section, one per guide page."""
    grouped: dict[str, tuple[Path, list[tuple[int, str]]]] = {}
    for page in PAGES:
        for section, start, code in python_blocks(page.read_text(encoding="utf-8"), name(page)):
            key = f"{name(page)}: {section}" if page == README else name(page)
            grouped.setdefault(key, (page, []))[1].append((start, code))
    return grouped


SESSIONS = sessions()


def slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def test_readme_and_guide_have_python_blocks():
    pages = {name(page) for page, _ in SESSIONS.values()}
    # the parser found the library snippet, the transference, data API and learn2learn code
    assert {"README.md", "docs/guide/transference.md", "docs/guide/library.md", "docs/guide/integrations.md"} <= pages
    assert any(key.startswith("README.md: kml as a library") for key in SESSIONS), sorted(SESSIONS)


def test_readme_is_a_front_page():
    # what kml is, setting up, the demo, the library, the methods, links into the guide; the rest is in docs/guide
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines: move reference material into docs/guide/"


def test_readme_install_and_test_commands_are_what_ci_runs():
    # .ci/run runs the README's install and test commands: the README must show exactly those
    text = README.read_text(encoding="utf-8")
    install = [block for section, _, block in fenced_blocks(text, "README.md", "bash") if section == "Install and test"]
    assert install, "README.md: no ```bash block under '## Install and test'"
    commands = [line.strip() for line in install[0].splitlines() if line.strip()]
    assert commands == ['pip install -e ".[dev]"', "pytest"], commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for command in commands:
        assert command in (line.strip() for line in ci), f".ci/run does not run the README's {command!r}"


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


@pytest.mark.parametrize("session", list(SESSIONS), ids=[slug(s) for s in SESSIONS])
def test_python_session_runs(session, tmp_path, monkeypatch):
    page, blocks = SESSIONS[session]
    filename = name(page)
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
                pytest.fail(f"{error}; CI (or KML_REQUIRE_LEARN2LEARN=1) must run the learn2learn code of {filename}")
            pytest.skip(str(error))
        monkeypatch.setattr(l2l.vision.benchmarks, "get_tasksets", offline_get_tasksets(tmp_path / "l2l-source"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    namespace: dict = {"__name__": "__readme__"}
    try:
        for start, code in blocks:
            tree = ast.parse(code, filename)
            ast.increment_lineno(tree, start - 1)  # a traceback names the page and its line
            exec(compile(tree, filename, "exec"), namespace)
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
