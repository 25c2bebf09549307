"""mkdocs hook: the repository's README.md is the site's home page, and the repository files the pages link to
come along.

The README stays the front page of the repository and the first page of the site, and the guide pages in
``docs/guide/`` link to files outside ``docs/`` (``../../examples/README.md``, ``../../benchmarks/results_cpu.png``)
the way GitHub shows them. Here:

- ``README.md`` becomes the page ``index.md``;
- every repository file outside ``docs/`` that a page links to (relative links and images, followed through the
  linked Markdown pages too) is added to the site at its repository path: ``examples/README.md`` is the page
  ``examples/``, ``benchmarks/results_cpu.png`` the image ``benchmarks/results_cpu.png``;
- each relative link is rewritten from the repository's layout to the site's (``docs/guide/cli.md`` in the README
  is ``guide/cli.md`` on the home page; ``../../README.md#x`` in a guide page is ``../index.md#x``), so strict mode
  checks every link, anchors included, like any link of the site. A link to a missing file stays as written and
  strict mode reports it.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
HOME = ROOT / "README.md"
LINK = re.compile(r"(\]\()([^()\s]+)(\))")  # [text](target) and ![alt](target); autorefs' [text][id] is not a path
FENCE = re.compile(r"^\s*(```|~~~)")


def site_path(path: Path) -> str:
    """Where the repository file ``path`` is in the site: ``docs/X`` -> ``X``, README.md -> ``index.md``."""
    if path == HOME:
        return "index.md"
    if DOCS in path.parents:
        return path.relative_to(DOCS).as_posix()
    return path.relative_to(ROOT).as_posix()


def repository_target(source: Path, target: str) -> tuple[Path, str] | None:
    """The repository file a relative link of ``source`` points to, and the link's ``#anchor`` (or "")."""
    if "://" in target or target.startswith(("/", "#", "mailto:")):
        return None
    path, _, anchor = target.partition("#")
    resolved = Path(os.path.normpath(source.parent / path))
    if not resolved.is_file() or ROOT not in resolved.parents:
        return None
    return resolved, f"#{anchor}" if anchor else ""


def outside_fences(markdown: str):
    """``(is code, chunk)`` pieces of ``markdown``: fenced code blocks are never rewritten."""
    chunk: list[str] = []
    fenced = False
    for line in markdown.splitlines(keepends=True):
        if FENCE.match(line):
            if not fenced:
                if chunk:
                    yield False, "".join(chunk)
                chunk, fenced = [line], True
                continue
            chunk.append(line)
            yield True, "".join(chunk)
            chunk, fenced = [], False
            continue
        chunk.append(line)
    if chunk:
        yield fenced, "".join(chunk)


def linked_files(source: Path) -> list[Path]:
    text = source.read_text(encoding="utf-8")
    found = []
    for code, chunk in outside_fences(text):
        if not code:
            for match in LINK.finditer(chunk):
                target = repository_target(source, match.group(2))
                if target is not None:
                    found.append(target[0])
    return found


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "index.md", abs_src_path=str(HOME)))
    queue = [HOME, *sorted(DOCS.rglob("*.md"))]
    seen = set(queue)
    while queue:
        source = queue.pop(0)
        for path in linked_files(source):
            if path in seen or DOCS in path.parents:
                continue  # docs/ files are the site's own
            seen.add(path)
            uri = site_path(path)
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
            if path.suffix == ".md":
                queue.append(path)
    return files


def on_page_markdown(markdown: str, /, *, page, **kwargs: Any) -> str:  # noqa: ARG001 - mkdocs passes more
    source = Path(page.file.abs_src_path)
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match) -> str:
        target = repository_target(source, match.group(2))
        if target is None:
            return match.group(0)
        path, anchor = target
        return f"{match.group(1)}{posixpath.relpath(site_path(path), here or '.')}{anchor}{match.group(3)}"

    return "".join(chunk if code else LINK.sub(rewrite, chunk) for code, chunk in outside_fences(markdown))
