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
    "learner.py": ["ratio", "peak MiB", "GFLOP/s", "% att."],
    "layer_forms.py": ["packed (grouped conv, fused norm)", "shared conv only"],
    "generic_learner.py": ["packed / generic", "resnet12"],
    "train_throughput.py": ["ratio kml / published-style", "episodes/s", "GFLOP/s"],
    "sweep.py": ["tasks/s", "peak"],
    "multimodal_synthetic.py": ["held-out accuracy", "mean transference Z"],
    "memory.py": ["peak MiB", "checkpointed", "both"],
    "shared_cpu.py": ["pair/solo", "busy/solo"],
    "run_all.py": ["| learner (ok)", "| memory (ok)", "total"],
    "released_codes.py": ["released omniglot: 1623 character folders", "kml / released", "mmaml-as-released"],
}


@pytest.mark.parametrize("script", CASES)
def test_benchmark_smoke_run_prints_its_figures(script, tmp_path):
    argv = [sys.executable, str(BENCHMARKS / script), "--smoke"]
    if script == "sweep.py":
        argv += ["--plot", str(tmp_path / "sweep.png")]
    if script == "shared_cpu.py":
        argv += ["--policies", "kml"]
    if script == "run_all.py":
        argv += ["--device", "cpu", "--out", str(tmp_path / "results")]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for expected in CASES[script]:
        assert expected in done.stdout, done.stdout
    if script == "sweep.py":
        assert (tmp_path / "sweep.png").stat().st_size > 0
    if script == "run_all.py":  # every benchmark's own output is kept beside the summary
        assert {p.name for p in (tmp_path / "results").iterdir()} == {"learner.txt", "memory.txt", "summary.md"}


@pytest.mark.skipif(not bf16_native("cpu"), reason="no native bf16 on this CPU")
def test_learner_benchmark_with_bf16_prints_both_reference_rows(tmp_path):
    argv = [sys.executable, str(BENCHMARKS / "learner.py"), "--smoke", "--bf16", "--methods", "kml-protonet"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reference  fp32" in done.stdout and "reference  bf16" in done.stdout and "batched    bf16" in done.stdout
    assert "(batched bf16 / reference fp32)" in done.stdout and "(batched / reference, both bf16)" in done.stdout
