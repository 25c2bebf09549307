"""The public API: light `import kml`, every exported name resolves, every module declares `__all__`."""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import subprocess
import sys

import pytest

import kml


def all_modules() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages(kml.__path__, "kml."))


def test_import_kml_loads_neither_torch_nor_the_heavy_optional_libraries():
    code = (
        "import sys, kml; kml.__all__; "
        "print(sorted(m for m in ('torch', 'matplotlib', 'pandas', 'torchvision') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_top_level_name_resolves_to_what_it_names():
    for name, module in kml._LAZY.items():
        assert getattr(kml, name).__module__ == module, name  # the lazy table names the defining module
    assert kml.__version__ == importlib.metadata.version("kml")  # one version, read by the package metadata too
    with pytest.raises(AttributeError):
        kml.not_a_name  # noqa: B018


@pytest.mark.parametrize("module", all_modules())
def test_every_module_declares_its_public_names(module):
    imported = importlib.import_module(module)
    assert hasattr(imported, "__all__"), f"{module} has no __all__"
    missing = [name for name in imported.__all__ if not hasattr(imported, name)]
    assert not missing, f"{module}.__all__ names {missing}, which it does not define"
