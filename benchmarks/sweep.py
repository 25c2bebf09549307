"""How the cost of one meta-training step grows with meta-batch size, shots, ways and image side.

Each configuration runs in a fresh process so that its peak memory is its own
(CPU: peak resident memory above the process's baseline; CUDA: peak allocated).
Prints a table and writes a plot (``--plot``, default benchmarks/sweep.png).

    python benchmarks/sweep.py                     # KML + MAML, CPU
    python benchmarks/sweep.py --algorithm protonet --device cuda
    python benchmarks/sweep.py --smoke             # two tiny configurations, for CI
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

BASE = {"meta_batch": 10, "shots": 1, "ways": 5, "side": 84}
AXES = {"meta_batch": [1, 2, 5, 10, 20], "shots": [1, 5, 10], "ways": [5, 10, 20], "side": [28, 42, 84]}


def measure(config: dict) -> dict:
    """Time ``repeats`` meta-training steps of one configuration (run inside the child process)."""
    import torch
    from common import peak_memory_mib, synchronize

    from kml.algorithms import build_learner
    from kml.config import LearnerConfig
    from kml.data.sampler import MixtureSampler
    from kml.data.synthetic import generate_store

    torch.manual_seed(0)
    device = config["device"]
    per_class = config["shots"] + config["queries"]
    store = generate_store("shapes", "train", classes=max(config["ways"], 20), images_per_class=max(20, per_class))
    store = store.conformed(config["side"], 3).to(device)
    sampler = MixtureSampler([store], config["ways"], config["shots"], config["queries"], config["meta_batch"], seed=0)
    learner = build_learner(
        LearnerConfig(
            algorithm=config["algorithm"],
            modulation="kml",
            ways=config["ways"],
            image_size=config["side"],
            base_channels=config["channels"],
            encoder_channels=config["channels"],
            inner_steps=config["inner_steps"],
        )
    ).to(device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad()
        learner(sampler.sample()).loss.backward()
        optimizer.step()

    baseline = peak_memory_mib("cpu")
    step()
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(config["repeats"]):
        step()
    synchronize(device)
    peak = peak_memory_mib(device, baseline)
    seconds = (time.perf_counter() - start) / config["repeats"]
    return {"step_ms": 1000 * seconds, "tasks_per_s": config["meta_batch"] / seconds, "peak_mib": peak}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        from kml.runtime import tune_cpu_allocator

        tune_cpu_allocator()  # as kml-train does
        print(json.dumps(measure(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", default="maml", choices=("maml", "protonet"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plot", default="benchmarks/sweep.png", help="where to save the plot ('' for none)")
    parser.add_argument("--smoke", action="store_true", help="two tiny configurations, for CI")
    args = parser.parse_args()
    common = {
        "algorithm": args.algorithm,
        "device": args.device,
        "channels": args.channels,
        "inner_steps": args.inner_steps,
        "queries": args.queries,
        "repeats": args.repeats,
    }
    base, axes = dict(BASE), AXES
    if args.smoke:
        base = {"meta_batch": 2, "shots": 1, "ways": 3, "side": 16}
        axes = {"meta_batch": [1, 2]}
        common.update(channels=4, inner_steps=1, queries=2, repeats=1)
    rows = []
    for axis, values in axes.items():
        for value in values:
            config = {**common, **base, axis: value}
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True, check=True
            ).stdout
            rows.append({"axis": axis, **{k: config[k] for k in base}, **json.loads(out.strip().splitlines()[-1])})
            r = rows[-1]
            print(
                f"{axis:<11} meta_batch={r['meta_batch']:<3} shots={r['shots']:<3} ways={r['ways']:<3} side={r['side']:<3} "
                f"step {r['step_ms']:8.1f} ms  {r['tasks_per_s']:7.1f} tasks/s  peak {r['peak_mib']:7.1f} MiB",
                flush=True,
            )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axs = plt.subplots(1, len(axes), figsize=(3.2 * len(axes), 3), squeeze=False)
        for ax, axis in zip(axs[0], axes):
            part = [r for r in rows if r["axis"] == axis]
            ax.plot([r[axis] for r in part], [r["step_ms"] for r in part], marker="o")
            ax.set_xlabel(axis)
            ax.set_ylabel("ms per meta-training step")
            ax.grid(alpha=0.3)
        fig.suptitle(f"KML + {args.algorithm} step cost ({args.device}); others at {base}", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
