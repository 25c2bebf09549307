"""Test-suite setup shared by every test module."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

from kml.runtime import configure_threads

# Before any test module imports torch: kml's thread and wait policy, so the suite shares the CPU fairly
# with whatever else runs (and the kml-train subprocesses the tests start inherit it).
configure_threads()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default=os.environ.get("KML_TEST_DEVICE", "cpu"),
                     help="device of the tests that take the `device` fixture (default: $KML_TEST_DEVICE or cpu)")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """The device the equality tests run on: ``pytest --device cuda`` or ``KML_TEST_DEVICE=cuda pytest``."""
    name = request.config.getoption("--device")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.fail(f"--device {name} asked for, but CUDA is not available")
    return name


@pytest.fixture(scope="session")
def download_cli() -> ModuleType:
    """The repository's ``download.py``, loaded by path (it is a script at the root, not part of the package)."""
    spec = importlib.util.spec_from_file_location("kml_download_cli", Path(__file__).resolve().parents[1] / "download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
