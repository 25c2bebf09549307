"""mkdocs hook: kml's public names (``kml.MAML``, ``kml.Trainer``, ...: ``kml.__all__``) as cross-reference targets.

``[kml.MAML][]`` in a guide page, or ``:class:`~kml.MAML``` in a docstring, links to the entry of the object the
name stands for, where it is defined (``kml.algorithms.maml.MAML`` on its module's page). mkdocstrings alone
knows such a name only as an alias of every page that renders the object (the defining module's page and the
pages of the packages re-exporting it), which is ambiguous from a page outside ``api/``; this hook makes the
defining entry the name's one target. It runs after mkdocstrings rendered the pages, before autorefs resolves
the references.
"""

from __future__ import annotations

from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "kml"


def on_env(env, config, files):
    autorefs = config.plugins["autorefs"]
    package = griffe.load(PACKAGE, search_paths=[str(ROOT)], resolve_aliases=False)
    pages = {file.page.url: file.page for file in files if file.page is not None}
    # kml.__all__ is built at import time (``[..., *sorted(_LAZY)]``); statically, its names are the package's
    # public members that are not submodules (each imported under TYPE_CHECKING, or defined in __init__).
    for name, member in package.members.items():
        if name.startswith("_"):
            continue
        try:
            if member.is_module:
                continue
            target = member.final_target.path if member.is_alias else member.path
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue  # from __future__, typing, ...: outside the package
        try:
            url = autorefs.get_item_url(target)[0]  # where the object is documented (a primary anchor)
        except KeyError:
            continue  # not rendered on any page: references to it stay unresolved (code, or a strict error)
        identifier = f"{PACKAGE}.{name}"
        if identifier in getattr(autorefs, "_primary_url_map", {}):
            continue  # an API page renders the name itself
        page_url, _, anchor = url.partition("#")
        if page_url in pages:
            autorefs.register_anchor(pages[page_url], identifier, anchor, primary=True)
    return env
