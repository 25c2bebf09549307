"""kml-train: meta-train a learner on one or several modes.

kml-train --modes synthetic                               # the no-download demo (README: the demo)
kml-train --recipe mmaml --modes omniglot miniimagenet FC100   # MMAML's released network and schedule (fixed)
kml-train --recipe mmaml-as-released --modes omniglot miniimagenet FC100   # ... with its training quirks too
kml-train --modes omniglot miniimagenet FC100 --shots 5   # published 3-mode setup (KML + MAML)
kml-train --modes omniglot miniimagenet --algorithm protonet --modulation film
kml-train --network my_pkg.nets:ResNet18 --network-args '{"num_classes": 0}' --algorithm protonet --modulation kml
torchrun --nproc_per_node 4 -m kml.cli.train --modes ...  # tasks of a meta-batch split across GPUs
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from kml.cli.common import ArgumentParser, continue_run_as_command, json_object, read_config_file
from kml.config.learner import FIELD_CHOICES, upgrade_field_names
from kml.errors import KMLError, exit_on_kml_error
from kml.runtime.threads import configure_threads

__all__ = [
    "upgrade_renamed_flags",
    "build_parser",
    "CHOICE_HELP",
    "config_from_values",
    "count_or_all",
    "LEARNER_FLAGS",
    "main",
    "QUIRK_HELP",
    "RUN_FLAGS",
    "SWITCHES",
]


def count_or_all(text: str) -> int | None:
    """An argparse type: a count, or ``all`` (``None``: no limit)."""
    if text.lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of checkpoints or all, got {text!r}") from None


RUN_FLAGS = {
    # name: (type, help) -- defaults come from RunConfig; {datasets} and {demo} in a help text are filled from
    # kml.config.run's DATASET_DEFAULTS and SYNTHETIC_DEMO
    "ways": (int, "classes per task (N)"),
    "shots": (int, "labelled support images per class (K)"),
    "queries": (int, "query images per class (Q)"),
    "meta_batch": (int, "tasks per outer step (default {datasets}; {demo} for the synthetic demo)"),
    "steps": (int, "outer steps (default {datasets} as published; {demo} for the synthetic demo)"),
    "lr": (float, "outer (Adam) learning rate"),
    "lr_halve_every": (int, "halve the outer learning rate every this many steps"),
    "seed": (int, "seed of sampling and initialisation"),
    "device": (str, "auto, cpu, cuda or cuda:N"),
    "data_root": (str, "folder holding the dataset caches (see kml-download)"),
    "image_size": (int, "common side length of all modes (default: the largest stored side)"),
    "train_dir": (str, "folder of run folders"),
    "run_name": (
        str,
        "name of the run folder (default: method_modes_NwKs; the method is the recipe's name with --recipe)",
    ),
    "val_every": (
        int,
        "validate on meta-val classes every this many steps (default {datasets}; {demo} for the synthetic demo)",
    ),
    "val_episodes": (int, "validation episodes per mode (default {datasets}; {demo} for the synthetic demo)"),
    "checkpoint_every": (
        int,
        "save last.pt and a periodic checkpoint every this many steps (default {datasets}; {demo} for the synthetic demo)",
    ),
    "keep_checkpoints": (
        count_or_all,
        "periodic checkpoints kept, the newest (default 3; 0: none, all: every one); last.pt and best.pt are always "
        "kept; applied on --resume too",
    ),
    "log_every": (int, "write a metrics.csv row every this many steps"),
    "grad_clip": (float, "clip the meta-gradient norm (off by default)"),
    "transference_every": (int, "record task transference every this many steps (0: off)"),
    "transference_batches": (int, "meta-batches analysed at each transference record"),
    "task_chunk": (int, "accumulate the meta-gradient over chunks of this many tasks (same update, less memory)"),
}
LEARNER_FLAGS = {
    "inner_steps": (int, "MAML inner steps while training"),
    "eval_inner_steps": (int, "MAML inner steps at validation and test"),
    "inner_lr": (float, "MAML inner learning rate"),
    "inner_grad_clip": (float, "clip inner-loop gradients to this norm"),
    "inner_grad_clamp": (float, "clamp every inner-gradient element to [-x, x] (MMAML: 20)"),
    "encoder_hidden": (int, "Linear(8E, this) + ReLU per image in the task encoder (published: 128)"),
    "base_channels": (
        int,
        "C: the blocks have C, 2C, 4C, 8C channels (published), C each (conv4), 2C, 5C, 10C, 20C (resnet12)",
    ),
    "encoder_channels": (int, "channels of the task encoder"),
    "network": (
        str,
        "your own network instead of kml's backbones, by import path package.module:Name (an nn.Module subclass, "
        "or a function annotated to return one); recorded, so kml-eval and --resume rebuild it",
    ),
    "network_args": (json_object, "keyword arguments of --network as a JSON object, e.g. '{\"num_classes\": 5}'"),
}
CHOICE_HELP = {
    # name: help -- the choices come from kml.config.FIELD_CHOICES and kml.config.run.LR_SCHEDULES
    "algorithm": "meta-learner: MAML inner loop or prototypical head",
    "modulation": "task modulation: Kernel ModuLation, FiLM (MMAML) or none (plain)",
    "backbone": "published: stride-2 convs, no pooling; conv4: max-pool blocks; resnet12: 64-160-320-640 residual blocks",
    "kml_form": "KML form: W*(1+M) (identity at start) or W*M (released code)",
    "factor_split": "KML factors: (out, in*k*k) or the released code's split",
    "head": "features: the last map flattened, or its spatial mean (MMAML's MAML head)",
    "init": "encoder/generator initialisation: kml's, or PyTorch's default (released codes)",
    "kml_bias": "KML's bias shift: on the conv bias (as defined; a batch-statistics BatchNorm removes it) or after the BatchNorm (ablation)",
    "lr_schedule": "outer learning rate halved every --lr-halve-every steps (KML) or constant (MMAML)",
    "batch_norm": "BatchNorm statistics: each support and query set's own (MAML's convention) or the network's "
    "running statistics, never updated (inductive; needs a --network that keeps them)",
}
# The released codes' quirks (kml.config.run.RELEASED_QUIRKS), each a switch recorded in config.json.
QUIRK_HELP = {
    "released_query_modulation": "released KML quirk: modulate ProtoNet's query pass from the query images",
    "released_refinement": "released KML quirk: the refinement drops each class's last support image, pairs by position",
    "released_sampling": "released quirk: each mode draws meta-batch tasks, every slot picks one with replacement",
    "released_lr_timing": "released KML quirk: each rate halving one step early (before 1-based step 10000)",
    "released_checkpoint": "released quirk: the final checkpoint holds steps-1 updates (saved before the last); no best.pt",
}
SWITCHES = {
    "multi_maml": ("learner", "one set of meta-parameters per mode, told the mode (oracle baseline)"),
    "first_order": ("learner", "first-order MAML (no second derivatives)"),
    "meta_sgd": ("learner", "learn a per-parameter inner learning rate (Meta-SGD)"),
    "encoder_uses_labels": ("learner", "feed one-hot support labels to the task encoder"),
    "bf16": (
        "run",
        "bf16 autocast (CUDA from Ampere on, or a CPU with AMX/AVX512-BF16): faster steps (docs/guide/performance.md)",
    ),
    "activation_checkpointing": (
        "run",
        "MAML: recompute each inner step in the backward pass instead of storing it (less memory, more compute)",
    ),
    "compile": ("run", "torch.compile the learner (ProtoNet or first-order MAML; minutes of compiling)"),
    "allow_data_departure": (
        "run",
        "let a published --recipe train on caches made otherwise than its published data (e.g. Omniglot at 28 px); "
        "config.json records each departure in data_departures",
    ),
}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="kml-train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    from kml.config.run import DATASET_DEFAULTS, LR_SCHEDULES, SYNTHETIC_DEMO
    from kml.data.sampler import MIXTURE_POLICIES  # here: importing kml.cli.train must not import torch

    parser.add_argument(
        "--modes",
        nargs="+",
        metavar="MODE",
        help="modes to mix: omniglot miniimagenet fc100 cub aircraft, glyphs textures shapes (or synthetic), "
        "folder:PATH, or [NAME=]folder[,fractions=70/15/15][,seed=N]:PATH (a short name, the class split)",
    )
    parser.add_argument(
        "--split-fractions",
        nargs=3,
        type=float,
        metavar=("TRAIN", "VAL", "TEST"),
        help="class split of every folder mode that sets none (default 0.7 0.15 0.15; recorded in the mode's name)",
    )
    parser.add_argument("--split-seed", type=int, metavar="N", help="seed of that class split (default 123)")
    parser.add_argument("--policy", choices=MIXTURE_POLICIES, help="how tasks of a meta-batch pick their mode")
    parser.add_argument(
        "--weights", nargs="+", type=float, metavar="W", help="mode weights for the mixture (one per mode)"
    )
    choices = {**FIELD_CHOICES, "lr_schedule": LR_SCHEDULES}
    for name, text in CHOICE_HELP.items():
        parser.add_argument(f"--{name.replace('_', '-')}", choices=choices[name], help=text)
    for name, (kind, text) in {**RUN_FLAGS, **LEARNER_FLAGS}.items():
        if name in SYNTHETIC_DEMO:
            text = text.format(datasets=DATASET_DEFAULTS[name], demo=SYNTHETIC_DEMO[name])
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help=text)
    for name, (_, text) in SWITCHES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", action="store_true", help=text)
    _add_presets_and_run_control(parser)
    return parser


def _add_presets_and_run_control(parser: ArgumentParser) -> None:
    """--recipe, the on/off flags of defaults that are on, --config, and resuming or overwriting a run."""
    from kml.config.recipes import RECIPES

    parser.add_argument(
        "--recipe",
        choices=list(RECIPES),
        metavar="NAME",
        help="start from a named, versioned preset (flags given here override it): "
        + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()),
    )
    parser.add_argument(
        "--batchnorm-affine",
        action=argparse.BooleanOptionalAction,
        help="learned BatchNorm scale and shift in the backbone (default on; MMAML: off)",
    )
    parser.add_argument(
        "--identity-init",
        action=argparse.BooleanOptionalAction,
        help="start the modulation generators at the identity (default on; released codes: off)",
    )
    parser.add_argument(
        "--no-rotate-omniglot",
        dest="rotate_omniglot",
        action="store_false",
        help="do not rotate Omniglot classes by random multiples of 90 degrees",
    )
    parser.add_argument(
        "--no-bf16",
        dest="bf16",
        action="store_false",
        help="float32 (e.g. to resume a --bf16 run on a device without native bf16)",
    )
    parser.add_argument(
        "--no-proto-refine",
        dest="proto_refine",
        action="store_false",
        help="ProtoNet without the transductive prototype refinement",
    )
    for name, text in QUIRK_HELP.items():  # on in the "-as-released" recipes; --no-NAME turns one off
        parser.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, help=text)
    parser.add_argument(
        "--config", metavar="FILE", help="JSON or YAML file of flag values; flags given here override it"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run named by --run-name from its last.pt")
    parser.add_argument(
        "--resume-from",
        metavar="CHECKPOINT",
        help="continue the run from this one of its checkpoints instead of last.pt (e.g. step_000009.pt); implies --resume",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete an existing kml run folder of the same name first"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_values(values: dict[str, Any]):
    """Split flat flag values into a RunConfig with its LearnerConfig (:func:`kml.training.launch.config_from_values`)."""
    from kml.training.launch import config_from_values as split

    return split(values)


# Flags renamed in 0.2.0 with the fields they set (CHANGELOG.md): an old command line still runs, with a warning.
RENAMED_FLAGS = {"--model": "--modulation"}
KML_FORM_VALUES = ("residual", "bare")  # values of the old --modulation, which --kml-form now takes


def upgrade_renamed_flags(argv: list[str]) -> list[str]:
    """``argv`` with the flags of kml 0.1 renamed: ``--modulation bare`` -> ``--kml-form bare``, then
    ``--model kml`` -> ``--modulation kml``; each rename prints one warning line."""
    out: list[str] = []
    for position, word in enumerate(argv):
        name, sep, value = word.partition("=")
        following = value if sep else (argv[position + 1] if position + 1 < len(argv) else "")
        if name == "--modulation" and following in KML_FORM_VALUES:
            print(f"warning: --modulation {following} is --kml-form {following} since kml 0.2.0", file=sys.stderr)
            out.append("--kml-form" + (f"={value}" if sep else ""))
        elif name in RENAMED_FLAGS:
            print(f"warning: {name} is {RENAMED_FLAGS[name]} since kml 0.2.0", file=sys.stderr)
            out.append(RENAMED_FLAGS[name] + (f"={value}" if sep else ""))
        else:
            out.append(word)
    return out


@exit_on_kml_error
def main(argv: list[str] | None = None) -> int:
    configure_threads()  # before torch loads OpenMP: a short spin, threads from the CPU affinity
    args = vars(build_parser().parse_args(upgrade_renamed_flags(sys.argv[1:] if argv is None else argv)))
    resume_from = args.pop("resume_from", None)
    resume, overwrite = args.pop("resume", False) or resume_from is not None, args.pop("overwrite", False)
    progress = args.pop("progress", True)
    # a config file written before 0.2 may use the learner's old field names
    values = upgrade_field_names(read_config_file(args.pop("config"))) if "config" in args else {}
    values.update(args)
    fractions, split_seed = values.pop("split_fractions", None), values.pop("split_seed", None)
    if fractions is not None or split_seed is not None:  # the split becomes part of each folder mode's name
        if resume:
            raise KMLError(
                "--split-fractions and --split-seed set a new run's folder split; a resumed run keeps its own"
            )
        from kml.data.modes import with_folder_split

        values["modes"] = with_folder_split(values.get("modes", ["synthetic"]), fractions, split_seed)

    from kml.runtime import tune_cpu_allocator
    from kml.training import launch
    from kml.training.distributed import init_distributed, shutdown

    # every setting is checked before anything is loaded or any folder touched (kml.config.checks)
    values = launch.checked_values(values, resume)
    tune_cpu_allocator()
    device = values.get("device", "auto")
    dist_info = init_distributed(device if device != "auto" else ("cuda" if _cuda() else "cpu"))
    try:
        with continue_run_as_command():
            trainer = launch.start(
                values,
                resume=resume,
                resume_from=resume_from,
                overwrite=overwrite,
                dist_info=dist_info,
                progress=progress,
            )
            path = trainer.fit()  # with --transference-every N, the trainer records transference.csv as it trains
    finally:
        shutdown(dist_info)
    if dist_info.is_main:
        print(f"{'interrupted; ' if trainer.interrupted else ''}checkpoint: {path}")
        print(f"evaluate with: kml-eval --checkpoint {shlex.quote(str(path))}")
    return 130 if trainer.interrupted else 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
