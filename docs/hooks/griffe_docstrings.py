"""Griffe extension (mkdocs.yml): kml's docstring conventions, rendered by the Google-style parser.

- ``a, b, c: description`` in an ``Args:`` or ``Attributes:`` section documents several names at once;
  it becomes one entry per name, each with the description (so every name is checked against the signature).
- Sphinx roles (``:class:`X```, ``:func:`~kml.x.f```, ...) become inline code (``X``, ``f``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

SECTIONS = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Attributes|Other Parameters):\s*$")
GROUP = re.compile(r"^(\s*)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)(\s*\([^)]*\))?:(\s.*)?$")
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const|paramref):`~?([^`]+)`")


def split_groups(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    section_indent = None
    item_indent = None
    while i < len(lines):
        line = lines[i]
        header = SECTIONS.match(line)
        if header:
            section_indent, item_indent = len(header.group(1)), None
            out.append(line)
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        if section_indent is not None and line.strip() and indent <= section_indent:
            section_indent = None  # the section ended
        if section_indent is not None and line.strip():
            if item_indent is None:
                item_indent = indent
            group = GROUP.match(line) if indent == item_indent else None
            if group:
                body = [line]
                i += 1
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > item_indent):
                    if not lines[i].strip() and (i + 1 >= len(lines) or not lines[i + 1].strip()):
                        break
                    body.append(lines[i])
                    i += 1
                names = [name.strip() for name in group.group(2).split(",")]
                for name in names:
                    out.append(f"{group.group(1)}{name}{group.group(3) or ''}:{group.group(4) or ''}")
                    out.extend(body[1:])
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class KMLDocstrings(griffe.Extension):
    """Rewrite each docstring once, when griffe loads the object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002 - griffe passes more
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", split_groups(obj.docstring.value))
