"""Every benchmark in one command, sized for a GPU lent for a few minutes (the whole set within 8 minutes).

Runs the scripts one after another with a time limit each, samples GPU utilisation with ``nvidia-smi``
while each runs, saves every script's output beside a summary, and prints the summary as the markdown
rows of benchmarks/README.md's GPU section (tasks/s, peak memory, utilisation, published-schedule
wall-time estimates).

    python benchmarks/run_all.py --device cuda --out gpu-results      # on the GPU machine
    python benchmarks/run_all.py --device cpu --smoke --out /tmp/x    # the CI-sized check of this script
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plan(device: str, bf16: bool, smoke: bool, out: Path) -> list[tuple[str, list[str], int]]:
    """(name, script and arguments, seconds allowed) of every benchmark, GPU-sized unless ``smoke``."""
    precision = ["--bf16"] if bf16 else []
    dev = ["--device", device]
    if smoke:
        return [
            ("learner", ["learner.py", "--smoke", "--methods", "kml-maml", *dev], 120),
            ("memory", ["memory.py", "--smoke", "--variants", "plain", "both", *dev], 120),
        ]
    return [
        ("learner", ["learner.py", *dev, *precision, "--steps", "10", "--warmup", "2"], 90),
        ("learner_fp32", ["learner.py", *dev, "--steps", "10", "--warmup", "2"], 60),
        (
            "generic_learner",
            [
                "generic_learner.py",
                *dev,
                *precision,
                "--steps",
                "5",
                "--warmup",
                "2",
                "--paths",
                "packed",
                "generic",
                "resnet12",
            ],
            60,
        ),
        ("train_throughput", ["train_throughput.py", *dev, *precision, "--steps", "30", "--eval-episodes", "300"], 120),
        ("sampler", ["sampler.py", *dev], 45),
        (
            "memory",
            [
                "memory.py",
                *dev,
                *precision,
                "--meta-batches",
                "10",
                "40",
                "80",
                "--inner-step-counts",
                "1",
                "5",
                "--chunk",
                "10",
                "--steps",
                "3",
            ],
            120,
        ),
        ("sweep", ["sweep.py", *dev, "--repeats", "1", "--plot", str(out / "sweep.png")], 60),
    ]


class UtilisationSampler:
    """GPU utilisation (%) and memory used (MiB) every 200 ms from ``nvidia-smi``, while a benchmark runs."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._process = None
        self._thread = None

    def __enter__(self) -> UtilisationSampler:
        if shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and all(p.replace(".", "").isdigit() for p in parts):
                self.samples.append((float(parts[0]), float(parts[1])))

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()

    def summary(self) -> str:
        if not self.samples:
            return "n/a"
        utilisation = [u for u, _ in self.samples]
        return f"{sum(utilisation) / len(utilisation):.0f}% mean, {max(m for _, m in self.samples):.0f} MiB max used"


def key_lines(output: str) -> list[str]:
    """The figure lines of a benchmark's output (ratios, rates, schedules, table rows)."""
    keep = re.compile(r"(ratio|tasks/s|episodes/s|schedule|x\s*$|^\s*\d)")
    return [line.rstrip() for line in output.splitlines() if keep.search(line)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 only")
    parser.add_argument("--out", default="gpu-results", help="folder for each benchmark's output and summary.md")
    parser.add_argument("--only", nargs="+", help="run only these benchmarks (names as printed)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU-sized run of this script, for CI")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bf16 = args.bf16 and not args.smoke and args.device.startswith("cuda")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    summary = [
        f"# kml benchmarks on {args.device} ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        "| benchmark | seconds | GPU utilisation | figures |",
        "|---|---|---|---|",
    ]
    started = time.perf_counter()
    failures = 0
    for name, command, limit in plan(args.device, bf16, args.smoke, out.resolve()):
        if args.only and name not in args.only:
            continue
        begin = time.perf_counter()
        with UtilisationSampler() as sampler:
            try:
                done = subprocess.run(
                    [sys.executable, str(HERE / command[0]), *command[1:]],
                    cwd=out,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=limit,
                )
                output, status = (
                    done.stdout + done.stderr[-3000:],
                    "ok" if done.returncode == 0 else f"exit {done.returncode}",
                )
            except subprocess.TimeoutExpired as timeout:
                output, status = (
                    (timeout.stdout or b"").decode() if isinstance(timeout.stdout, bytes) else (timeout.stdout or ""),
                    f"timed out after {limit} s",
                )
        seconds = time.perf_counter() - begin
        failures += status != "ok"
        (out / f"{name}.txt").write_text(f"$ python {' '.join(command)}\n{output}")
        figures = "<br>".join(key_lines(output)[:12]) or status
        summary.append(f"| {name} ({status}) | {seconds:.0f} | {sampler.summary()} | `{figures}` |")
        print(f"{name:<18}{status:<22}{seconds:>6.0f} s  GPU {sampler.summary()}", flush=True)
    summary += ["", f"total {time.perf_counter() - started:.0f} s"]
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
