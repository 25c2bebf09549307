"""Griffe extension (mkdocs.yml): kml's docstring conventions, rendered by the Google-style parser.

- ``a, b, c: description`` in an ``Args:`` or ``Attributes:`` section documents several names at once;
  it becomes one entry per name, each with the description (so every name is checked against the signature).
- Sphinx roles (``:class:`X```, ``:func:`~kml.x.f```, ``:meth:``, ``:mod:``, ...) become cross-references into
  the API pages (mkdocs-autorefs): ``:class:`~kml.data.episode.Episode``` is a link titled ``Episode`` to that
  class's entry, ``:class:`kml.data.episode.Episode``` the same titled with the full path. A name that is not a
  full path (``:class:`Episode```, ``:meth:`forward```, ``:meth:`Trainer.fit```) is resolved as Python would
  see it from the docstring's object: its class, its module's names and imports, then kml's public names.
  A name outside kml (``torch.func.vmap``) or one that resolves to nothing stays inline code. The references
  are autorefs' optional ones (as mkdocstrings writes for signatures): a kml object that no API page renders
  (a private helper, a module without a page) shows as code instead of failing ``mkdocs build --strict``.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

SECTIONS = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Attributes|Other Parameters):\s*$")
GROUP = re.compile(r"^(\s*)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)(\s*\([^)]*\))?:(\s.*)?$")
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const|paramref):`(~?)([^`]+)`")
ROOT = "kml"


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


def lookup(package: griffe.Module, path: str) -> griffe.Object | griffe.Alias | None:
    """The object at ``path`` (``kml.x.Y``) inside ``package``, or None."""
    if path == package.path:
        return package
    if not path.startswith(package.path + "."):
        return None
    try:
        return package[path[len(package.path) + 1 :]]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def canonical(found: griffe.Object | griffe.Alias) -> str:
    """The path where ``found`` is defined (an alias's final target), else its own path."""
    try:
        return found.final_target.path if found.is_alias else found.path
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return found.path


class References:
    """Resolves role targets of one package's docstrings to full paths."""

    def __init__(self, package: griffe.Module):
        self.package = package
        self.by_name: dict[str, set[str]] = {}  # last component -> canonical paths of the package's objects
        self._index(package)

    def _index(self, obj: griffe.Object) -> None:
        for member in obj.members.values():
            if member.is_alias:
                continue
            self.by_name.setdefault(member.name, set()).add(member.path)
            if member.is_module or member.is_class:
                self._index(member)

    def resolve(self, obj: griffe.Object, name: str) -> tuple[str, str] | None:
        """``(path as referenced, canonical path)`` of ``name`` seen from ``obj``'s docstring, or None."""
        name = name.strip().lstrip(".").removesuffix("()")
        head, _, tail = name.partition(".")
        candidates: list[str] = []
        if head == self.package.name:
            candidates.append(name)
        else:
            try:
                base = obj.resolve(head)  # the object's members, its class, its module's names and imports
            except griffe.NameResolutionError:
                base = None
            if base is not None:
                candidates.append(f"{base}.{tail}" if tail else base)
            candidates.append(f"{self.package.path}.{name}")  # kml's public names
            unique = self.by_name.get(name.rpartition(".")[2], set())
            matches = [path for path in unique if path == name or path.endswith("." + name)]
            if len(matches) == 1:
                candidates.append(matches[0])
        for path in candidates:
            found = lookup(self.package, path)
            if found is not None:
                return path, canonical(found)
        return None

    def replace(self, obj: griffe.Object, text: str) -> str:
        def role(match: re.Match) -> str:
            short, name = match.group(1) == "~", match.group(2).strip()
            title = name.rpartition(".")[2] if short else name
            code = f"<code>{html.escape(title)}</code>"
            resolved = self.resolve(obj, name)
            if resolved is None:
                return f"`{title}`"  # outside kml (torch, ...) or unknown: inline code, as before
            path, target = resolved
            slug = f' slug="{html.escape(target)}"' if target != path else ""
            return f'<autoref identifier="{html.escape(path)}"{slug} optional>{code}</autoref>'

        return ROLE.sub(role, text)


def objects(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from objects(member)


class KMLDocstrings(griffe.Extension):
    """Rewrite each docstring once: grouped names when griffe loads the object, roles once its package is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002 - griffe passes more
        if obj.docstring is not None:
            obj.docstring.value = split_groups(obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:  # noqa: ARG002 - griffe passes more
        references = References(pkg)
        for obj in objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = references.replace(obj, obj.docstring.value)
