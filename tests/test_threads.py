"""kml's thread and wait policy: what configure_threads sets, and that the entry points set it before torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kml.runtime.threads import SPIN_COUNT, SPIN_COUNTS, configure_threads, cpu_vendor, spin_count, thread_count


def test_default_policy_is_a_short_spin_and_one_thread_per_available_cpu():
    environ: dict[str, str] = {}
    chosen = configure_threads(environ)
    assert chosen == environ == {"OMP_NUM_THREADS": str(thread_count({})), "GOMP_SPINCOUNT": str(spin_count())}


@pytest.mark.parametrize(
    ("cpuinfo", "vendor", "spins"),
    [
        ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n", "GenuineIntel", SPIN_COUNTS["GenuineIntel"]),
        ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n", "AuthenticAMD", SPIN_COUNTS["AuthenticAMD"]),
        ("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n", "", SPIN_COUNT),  # arm64: no vendor_id
    ],
)
def test_the_spin_is_chosen_by_cpu_vendor(cpuinfo, vendor, spins):
    assert cpu_vendor(cpuinfo) == vendor
    assert spin_count(cpu_vendor(cpuinfo)) == spins


def test_user_choices_win_and_the_switch_turns_it_off():
    environ = {"OMP_WAIT_POLICY": "ACTIVE", "KML_NUM_THREADS": "3"}
    assert configure_threads(environ) == {"OMP_NUM_THREADS": "3"}  # the user's wait policy is kept
    assert configure_threads({"GOMP_SPINCOUNT": "0"}).get("GOMP_SPINCOUNT") is None
    untouched = {"KML_THREADS": "torch", "OMP_NUM_THREADS": "7"}
    assert configure_threads(untouched) == {} and untouched == {"KML_THREADS": "torch", "OMP_NUM_THREADS": "7"}


@pytest.mark.parametrize(
    ("environ", "cpus", "threads"),
    [
        ({}, 16, 16),
        ({"OMP_NUM_THREADS": "4"}, 16, 4),
        ({"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}, 16, 4),  # torchrun's default of 1 thread is replaced
        ({"LOCAL_WORLD_SIZE": "4"}, 2, 1),
        ({"LOCAL_WORLD_SIZE": "4", "KML_NUM_THREADS": "2"}, 16, 2),
    ],
)
def test_thread_count_shares_the_cpus_among_local_ranks(environ, cpus, threads):
    assert thread_count(environ, cpus) == threads


def run_python(code: str, **env: str) -> dict:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "KML_THREADS")
    }
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_threads_follow_the_cpu_affinity_in_a_fresh_process():
    code = (
        "import os, json; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from kml.runtime import configure_threads; configure_threads()\n"
        "import torch; print(json.dumps([torch.get_num_threads(), os.environ['GOMP_SPINCOUNT']]))"
    )
    assert run_python(code) == [1, str(spin_count())]


def test_entry_points_do_not_import_torch_before_configuring_threads():
    code = (
        "import sys, json\n"
        "import kml, kml.runtime, kml.cli.train, kml.cli.evaluate, kml.cli.transference, kml.cli.results, kml.cli.download\n"
        "print(json.dumps('torch' in sys.modules))"
    )
    assert run_python(code) is False


def test_kml_eval_runs_with_the_policy_in_its_environment(tmp_path):
    # the CLI sets the policy itself: a subprocess that reports what torch saw after main() configured it
    code = (
        "import json, os, sys\n"
        "from kml.cli import evaluate\n"
        "try:\n    evaluate.main(['--checkpoint', 'missing.pt'])\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(os.environ.get('GOMP_SPINCOUNT')))"
    )
    assert run_python(code) == str(spin_count())
