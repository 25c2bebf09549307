"""Every benchmark script runs in its CI-sized configuration and prints its figures (no timing asserts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kml.runtime import bf16_native

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

CASES = {
    "sampler.py": ["tasks/s"],
    "learner.py": ["ratio", "peak MiB"],
    "train_throughput.py": ["ratio kml / published-style", "episodes/s"],
    "sweep.py": ["tasks/s", "peak"],
    "multimodal_synthetic.py": ["held-out accuracy", "mean transference Z"],
}


@pytest.mark.parametrize("script", CASES)
def test_benchmark_smoke_run_prints_its_figures(script, tmp_path):
    argv = [sys.executable, str(BENCHMARKS / script), "--smoke"]
    if script == "sweep.py":
        argv += ["--plot", str(tmp_path / "sweep.png")]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for expected in CASES[script]:
        assert expected in done.stdout, done.stdout
    if script == "sweep.py":
        assert (tmp_path / "sweep.png").stat().st_size > 0


@pytest.mark.skipif(not bf16_native("cpu"), reason="no native bf16 on this CPU")
def test_learner_benchmark_with_bf16_prints_both_reference_rows(tmp_path):
    argv = [sys.executable, str(BENCHMARKS / "learner.py"), "--smoke", "--bf16", "--methods", "kml-protonet"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reference  fp32" in done.stdout and "reference  bf16" in done.stdout and "batched    bf16" in done.stdout
    assert "(batched bf16 / reference fp32)" in done.stdout and "(batched / reference, both bf16)" in done.stdout
