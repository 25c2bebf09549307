"""Accuracy with one budget: MAML, MMAML (FiLM) and KML + MAML on a mixture of the synthetic modes.

Each method trains with kml-train's own loop (same seed, steps, meta-batch,
backbone and inner loop), records task transference during training, and is
then evaluated on the held-out (meta-test) classes of every mode over the same
fixed episodes. Prints accuracy per mode with 95% confidence intervals, and the
mode-by-mode mean transference Z at the last recorded step for each method.

    python benchmarks/multimodal_synthetic.py                   # CPU-sized (its duration: benchmarks/README.md)
    python benchmarks/multimodal_synthetic.py --smoke           # tiny, for CI
    python benchmarks/multimodal_synthetic.py --keep train_dir/multimodal   # keep the runs (notebooks)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
import torch
from common import BF16_HELP

from kml.config import LearnerConfig
from kml.config.run import RunConfig
from kml.data.modes import load_stores
from kml.evaluation import evaluate
from kml.runtime import tune_cpu_allocator
from kml.training.trainer import Trainer
from kml.transference.aggregate import load_records, mode_matrix
from kml.transference.recorder import TransferenceRecorder

METHODS = {
    "MAML": dict(modulation="none"),
    "MMAML (FiLM)": dict(modulation="film"),
    "KML + MAML": dict(modulation="kml"),
}


def train_and_evaluate(name: str, args, train_dir: Path, data_root: Path) -> tuple[list, pd.DataFrame]:
    learner = LearnerConfig(
        algorithm="maml",
        base_channels=args.channels,
        encoder_channels=args.channels,
        inner_steps=args.inner_steps,
        eval_inner_steps=args.inner_steps,
        inner_lr=args.inner_lr,
        **METHODS[name],
    )
    config = RunConfig(
        modes=["synthetic"],
        ways=args.ways,
        shots=args.shots,
        queries=args.queries,
        meta_batch=args.meta_batch,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        data_root=str(data_root),
        image_size=args.side,
        train_dir=str(train_dir),
        run_name=learner.method,
        val_every=args.steps,
        val_episodes=30,
        checkpoint_every=args.steps,
        log_every=max(1, args.steps // 20),
        transference_every=args.transference_every,
        transference_batches=2,
        bf16=args.bf16,
        learner=learner,
    )
    trainer = Trainer.create(config, overwrite=True, progress=not args.no_progress)
    trainer.callbacks.append(TransferenceRecorder.from_trainer(trainer))  # what --transference-every adds
    trainer.fit()
    test = load_stores(["synthetic"], "test", data_root, side=args.side)
    results = evaluate(
        trainer.learner,
        test,
        args.ways,
        args.shots,
        args.queries,
        args.episodes,
        seed=1234,
        bf16=args.bf16,
        progress=not args.no_progress,
    )
    records = load_records(train_dir / learner.method)
    return results, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--meta-batch", type=int, default=6)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--inner-steps", type=int, default=3)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--episodes", type=int, default=300, help="test episodes per mode")
    parser.add_argument("--transference-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--bf16", action="store_true", help=BF16_HELP)
    parser.add_argument("--keep", help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI (figures meaningless)")
    args = parser.parse_args()
    tune_cpu_allocator()
    if args.smoke:
        args.steps, args.meta_batch, args.side, args.channels, args.queries = 4, 3, 16, 4, 2
        args.inner_steps, args.episodes, args.transference_every, args.no_progress = 1, 6, 2, True
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        train_dir = Path(args.keep) if args.keep else Path(tmp) / "train_dir"
        data_root = Path(tmp) / "data"
        table, matrices = [], {}
        for name in args.methods:
            results, records = train_and_evaluate(name, args, train_dir, data_root)
            for result in results:
                table.append(
                    {"method": name, "mode": result.mode, "accuracy": f"{result.accuracy:.2f} ± {result.ci95:.2f}"}
                )
            mean = sum(r.accuracy for r in results) / len(results)
            table.append({"method": name, "mode": "average", "accuracy": f"{mean:.2f}"})
            last = records[records["step"] == records["step"].max()]
            matrices[name] = mode_matrix(last)
    print(
        f"setup: synthetic modes, {args.ways}-way {args.shots}-shot {args.queries}-query, {args.side}px, "
        f"{args.steps} steps x meta-batch {args.meta_batch}, {args.channels} channels, {args.inner_steps} inner steps "
        f"(lr {args.inner_lr}), {args.episodes} test episodes per mode, seed {args.seed}, bf16 {args.bf16}, "
        f"torch {torch.__version__}"
    )
    print("\nheld-out accuracy (%, 95% CI)")
    print(pd.DataFrame(table).pivot(index="mode", columns="method", values="accuracy")[args.methods].to_string())
    for name, matrix in matrices.items():
        print(f"\nmean transference Z at the last recorded step, {name} (rows: source mode, columns: target mode)")
        print(matrix.to_string(float_format=lambda v: f"{v:+.4f}"))


if __name__ == "__main__":
    main()
