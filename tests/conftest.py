"""Test-suite setup shared by every test module."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from kml.runtime import configure_threads

# Before any test module imports torch: kml's thread and wait policy, so the suite shares the CPU fairly
# with whatever else runs (and the kml-train subprocesses the tests start inherit it).
configure_threads()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=os.environ.get("KML_TEST_DEVICE", "cpu"),
        help="device of the tests that take the `device` fixture (default: $KML_TEST_DEVICE or cpu)",
    )


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
    """The download command line (``kml-download``; the root ``download.py`` is a thin script over it)."""
    from kml.cli import download

    return download


@pytest.fixture(scope="session")
def synthetic_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """The three synthetic modes at 16 px, ``{"train": [...], "test": [...]}``, generated once per session.

    Read-only: the test modules draw their own episodes from them (each with its own sizes and seed).
    """
    from kml.data.modes import load_stores

    root = tmp_path_factory.mktemp("synthetic")
    return {split: load_stores(["synthetic"], split, root=root, side=16) for split in ("train", "test")}
