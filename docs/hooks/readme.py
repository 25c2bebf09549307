"""mkdocs hook: the repository's README.md as the page ``readme.md``, with the local files it links to.

The README stays the one source of the user guide (tests/test_readme.py runs its code); the site shows it
unchanged. Relative links and images in it (e.g. ``benchmarks/results_cpu.png``) are added at the same
paths, so strict mode checks them like any link of the site.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def on_files(files: Files, config) -> Files:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    files.append(File.generated(config, "readme.md", abs_src_path=str(readme)))
    for target in sorted(set(LINK.findall(text))):
        path = (ROOT / target).resolve()
        if "://" in target or target.startswith("/") or not path.is_file() or ROOT not in path.parents:
            continue  # external links; a missing target stays in the page and strict mode reports it
        if files.get_file_from_path(target) is None:
            files.append(File.generated(config, target, abs_src_path=str(path)))
    return files
