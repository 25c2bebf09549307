"""A training step alone and next to another CPU-heavy process, under each thread / wait policy.

Each policy runs a KML+MAML meta-training step (default: the issue's Omniglot-sized setup, 5w1s15q,
28 px, meta-batch 10, 5 second-order inner steps) in a fresh process: alone, then two such processes
side by side ("pair"), then next to a pure-Python busy loop ("beside a busy loop"). Workers start
timing together, after their warm-up, and time steps for ``--seconds``. Prints s/step per scenario (both
processes of the pair) and the ratio to solo (the pair's mean). ``--rounds R`` repeats the policies R times,
each round in a rotated order (solo figures drift between runs by more than the policies differ), and ends with
each policy's medians; ``--scenarios solo`` times only the solo step.

Policies: ``kml`` (what kml's entry points set: kml.runtime.configure_threads), ``torch`` (torch's and
libgomp's defaults), ``passive`` (OMP_WAIT_POLICY=PASSIVE), ``spin:N`` (GOMP_SPINCOUNT=N), ``threads:N``
(N threads, torch's spin).

    python benchmarks/shared_cpu.py                        # kml vs torch's defaults
    python benchmarks/shared_cpu.py --policies torch passive spin:1000 spin:10000 spin:100000 kml
    python benchmarks/shared_cpu.py --policies torch kml spin:1000 --scenarios solo --rounds 5
    python benchmarks/shared_cpu.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from kml.runtime.threads import cpu_vendor, spin_count


def policy_environment(policy: str) -> dict[str, str]:
    """Environment of a worker under ``policy`` (before torch is imported)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    if policy == "kml":
        env.pop("KML_THREADS", None)
        return env
    env["KML_THREADS"] = "torch"
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif policy.startswith("spin:"):
        env["GOMP_SPINCOUNT"] = policy.split(":", 1)[1]
    elif policy.startswith("threads:"):
        env["OMP_NUM_THREADS"] = policy.split(":", 1)[1]
    elif policy != "torch":
        raise SystemExit(f"error: unknown policy {policy!r}")
    return env


def worker(args: argparse.Namespace) -> None:
    """Child: set the policy, build the learner, warm up, say ready, wait for go, time steps."""
    from kml.runtime import configure_threads

    configure_threads()  # no-op under KML_THREADS=torch, as in kml-train
    import torch
    from common import outer_step, random_episode

    from kml.algorithms import build_learner
    from kml.config import LearnerConfig

    torch.manual_seed(0)
    learner = build_learner(
        LearnerConfig(
            ways=args.ways,
            image_size=args.side,
            base_channels=args.channels,
            encoder_channels=args.channels,
            inner_steps=args.inner_steps,
        )
    ).train()
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    episode = random_episode(args.meta_batch, args.ways, args.shots, args.queries, args.side, "cpu", modes=3)
    step = outer_step(learner, episode, optimizer, "cpu")
    step()
    print("ready", flush=True)
    sys.stdin.readline()
    steps, start = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - start < args.seconds:
        step()
        steps += 1
    print(
        json.dumps(
            {
                "seconds_per_step": (time.perf_counter() - start) / steps,
                "threads": torch.get_num_threads(),
                "env": {k: os.environ.get(k, "") for k in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")},
            }
        )
    )


def run_together(commands: list[tuple[list[str], dict[str, str]]], busy_loop: bool) -> list[dict]:
    """Start the workers, release them at once when all are warm, return their results."""
    here = os.path.dirname(os.path.abspath(__file__))
    workers = [
        subprocess.Popen(argv, env=env, cwd=here, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for argv, env in commands
    ]
    for process in workers:
        line = process.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"error: a worker failed to start: {line.strip() or process.wait()}")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy_loop else None
    try:
        for process in workers:
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [json.loads(process.stdout.readlines()[-1]) for process in workers]
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    for process in workers:
        process.wait()
    return results


def measure_policy(policy: str, setup: list[str], scenarios: list[str]) -> dict[str, float]:
    """Time ``scenarios`` under ``policy``, print the row, return s/step per scenario (the pair's mean)."""
    env = policy_environment(policy)
    argv = [sys.executable, os.path.abspath(__file__), *setup, "--worker"]
    row: dict[str, float] = {}
    threads = each = ""
    if "solo" in scenarios:
        solo = run_together([(argv, env)], busy_loop=False)[0]
        row["solo"], threads = solo["seconds_per_step"], solo["threads"]
    if "pair" in scenarios:
        pair = run_together([(argv, env), (argv, env)], busy_loop=False)
        row["pair"] = sum(r["seconds_per_step"] for r in pair) / len(pair)
        each = " / ".join(f"{r['seconds_per_step']:.3f}" for r in pair)
        threads = pair[0]["threads"]
    if "busy" in scenarios:
        busy = run_together([(argv, env)], busy_loop=True)[0]
        row["busy"], threads = busy["seconds_per_step"], busy["threads"]
    print(
        f"{policy:<14}{threads:>8}{_seconds(row, 'solo'):>13}{each:>20}{_ratio(row, 'pair'):>11}"
        f"{_seconds(row, 'busy'):>13}{_ratio(row, 'busy'):>11}",
        flush=True,
    )
    return row


def _seconds(row: dict[str, float], scenario: str) -> str:
    return f"{row[scenario]:.3f}" if scenario in row else "-"


def _ratio(row: dict[str, float], scenario: str) -> str:
    return f"{row[scenario] / row['solo']:.2f}x" if scenario in row and "solo" in row else "-"


def print_medians(figures: dict[str, dict[str, list[float]]]) -> None:
    """Each policy's median s/step per scenario, pair and busy over solo, solo over torch's defaults' solo."""
    medians = {policy: {k: statistics.median(v) for k, v in rows.items()} for policy, rows in figures.items()}
    torch_solo = medians.get("torch", {}).get("solo")
    print("medians over rounds")
    print(f"{'policy':<14}{'solo s/step':>13}{'pair s/step':>13}{'pair/solo':>11}{'busy/solo':>11}{'solo/torch':>12}")
    for policy, row in medians.items():
        versus_torch = f"{row['solo'] / torch_solo:.3f}x" if torch_solo and "solo" in row else "-"
        print(
            f"{policy:<14}{_seconds(row, 'solo'):>13}{_seconds(row, 'pair'):>13}{_ratio(row, 'pair'):>11}"
            f"{_ratio(row, 'busy'):>11}{versus_torch:>12}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=["torch", "kml"])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--side", type=int, default=28)
    parser.add_argument("--meta-batch", type=int, default=10)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per worker and scenario")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the policies, rotating their order")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["solo", "pair", "busy"],
        choices=["solo", "pair", "busy"],
        help="what to time",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny configuration for CI (figures meaningless)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.side, args.channels, args.queries, args.meta_batch, args.inner_steps, args.seconds = 16, 4, 2, 2, 1, 0.2
    if args.worker:
        worker(args)
        return
    setup = [
        f"--{name.replace('_', '-')}={getattr(args, name)}"
        for name in ("ways", "shots", "queries", "side", "meta_batch", "channels", "inner_steps", "seconds")
    ]
    print(
        f"KML+MAML {args.ways}w{args.shots}s{args.queries}q side={args.side} meta-batch={args.meta_batch} "
        f"channels={args.channels} inner-steps={args.inner_steps}, cpus={len(os.sched_getaffinity(0))}, "
        f"vendor={cpu_vendor() or 'unknown'} (kml's GOMP_SPINCOUNT={spin_count()})"
    )
    print(
        f"{'policy':<14}{'threads':>8}{'solo s/step':>13}{'pair s/step (each)':>20}{'pair/solo':>11}"
        f"{'busy s/step':>13}{'busy/solo':>11}"
    )
    figures: dict[str, dict[str, list[float]]] = {policy: {} for policy in args.policies}
    for round_index in range(args.rounds):
        shift = round_index % len(args.policies)
        for policy in args.policies[shift:] + args.policies[:shift]:
            row = measure_policy(policy, setup, args.scenarios)
            for scenario, seconds in row.items():
                figures[policy].setdefault(scenario, []).append(seconds)
    if args.rounds > 1:
        print_medians(figures)


if __name__ == "__main__":
    main()
