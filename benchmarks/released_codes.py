"""End-to-end meta-training throughput: kml against the two released research codes, run as they are.

The released codes are the KML paper's (sutd-visual-computing-group/KML-Classification: KML + ProtoNet with
transductive refinement) and MMAML's (shaohua0116/MMAML-Classification: FiLM + MAML with a ConvGRU task encoder,
5 second-order inner steps). Each runs its own ``main.py`` with its README's flags (its defaults otherwise: 5-way
1-shot 15-query, 84x84x3, meta-batch 10, 32 channels, 4 DataLoader workers per mode) plus ``--device cpu`` and a
``--num-batches`` that ends the run after the timed steps, in a subprocess whose working folder holds the data
root as ``./data``. kml trains the matching recipes end to end (``Trainer.fit``, as ``kml-train`` does) on the
same modes and images: ``kml-protonet-as-released`` and ``kml-protonet`` against the KML code,
``mmaml-as-released`` against MMAML; float32, and with ``--bf16`` also under bf16 autocast.

    git clone https://github.com/sutd-visual-computing-group/KML-Classification /tmp/KML-Classification
    git clone https://github.com/shaohua0116/MMAML-Classification /tmp/MMAML-Classification
    python benchmarks/released_codes.py --kml-code /tmp/KML-Classification --mmaml-code /tmp/MMAML-Classification \\
        [--steps N] [--maml-steps N] [--warmup W] [--bf16] [--modes omniglot miniimagenet] [--released-workers 0]
    python benchmarks/released_codes.py --smoke   # CI: no released code; data layouts and kml's side, tiny

The data root is built in a temporary folder, in the layout each released loader reads and as kml's caches:
Omniglot as ``data/omniglot-py/images_{background,evaluation}/<alphabet>/<character>/*.png`` (torchvision's
layout, which the released loaders glob), filled with the real characters of the authors' two small background
sets (MIT; 242 distinct characters) repeated to the full 1623 folders, so the released split (first 1100 folders
of the glob for meta-train) and kml's ``omniglot=released`` split both apply; mini-ImageNet as
``data/miniimagenet/{train,val,test}/<wnid>/<wnid><8 digits>.jpg`` (what MMAML's ``proc_miniimagenet.py`` makes)
holding kml's synthetic ``shapes`` images as 84x84 JPEGs under the Ravi & Larochelle class names, with the same
files in ``data/miniimagenet/images/`` and the split csv files, which kml's converter reads. Images differ from
the real ones only in content, which no step's cost depends on.

Timing, the same on both sides: the time at which each meta-batch is asked for (the released codes'
``MultimodalFewShotDataset.__next__``, kml's ``sampler.sample``), so a step is everything from one request to
the next (data loading, forward, backward, optimiser, logging, saving). The first ``--warmup`` steps are dropped
(the released codes' first step also saves a checkpoint and logs; their periodic saves and logs come every 1000
and 100 steps). "data wait" is the share of the timed steps spent inside that request. "kml / released" is a
kml row's tasks/s over its released code's row run with the authors' defaults (``--released-workers N`` adds rows
of the released codes with ``--num-workers N``, for the share of their DataLoader).

The released codes need a few runtime shims (a driver this script writes runs ``main.py`` with them; no file of
theirs is changed): Python 3.11's ``random.sample`` refuses the sets their ``ClassBalancedSampler`` passes (3.10
took ``tuple(set)``, which the shim does); ``tensorboardX``, which they import, is replaced by
``torch.utils.tensorboard``; torchvision's Omniglot md5 check of the official zips passes when the extracted
folders are there (the data root holds no zips).
"""

from __future__ import annotations

import os

# the released codes run with the environment this script was started with, not kml's thread policy below
RELEASED_ENV = dict(os.environ)

import argparse  # noqa: E402
import csv  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import common  # noqa: E402 - kml's thread policy, before torch loads
import torch  # noqa: E402

from kml.runtime import check_bf16, tune_cpu_allocator  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "omniglot-small"
MODES = ("omniglot", "miniimagenet")
# Omniglot's two archives: character folders of images_background and images_evaluation (torchvision's counts)
OMNIGLOT_FOLDERS = (("images_background", 964), ("images_evaluation", 659))
RELEASED_TRAIN_CHARACTERS = 1100  # both released main.py: --num-train-classes default
DEAD_MIRROR = "http://127.0.0.1:9/"  # kml's converter finds every file on disk; it must never reach out
# what each released code trains, its README flags (2 modes, 5-way 1-shot), and the kml recipes it is compared with
RELEASED = {
    "kml": {
        "repo": "KML-Classification",
        "package": "scripts",
        "method": "KML+ProtoNet, transductive",
        "flags": ["--kml-model", "True"],
        "folder": "kml_{modes}mode_5w1s",
        "recipes": ("kml-protonet-as-released", "kml-protonet"),
    },
    "mmaml": {
        "repo": "MMAML-Classification",
        "package": "maml",
        "method": "MMAML, 5 second-order inner steps",
        "flags": ["--dataset", "multimodal_few_shot", "--mmaml-model", "True"],
        "folder": "mmaml_{modes}mode_5w1s",
        "recipes": ("mmaml-as-released",),
    },
}

DRIVER = '''\
"""Run a released main.py unchanged with runtime shims; print when each meta-batch was asked for."""
import collections.abc
import importlib
import json
import os
import random
import runpy
import sys
import time
import types

spec = json.loads(open(sys.argv[1]).read())
sys.path.insert(0, spec["code"])

# Python 3.11 refuses random.sample(set); their ClassBalancedSampler passes sets and dict keys (3.10: tuple(set))
_sample = random.sample


def _sample_from_set(population, k, **kwargs):
    if isinstance(population, collections.abc.Set):
        population = tuple(population)
    return _sample(population, k, **kwargs)


random.sample = _sample_from_set

# tensorboardX is not installed: torch's SummaryWriter has the add_scalar they call
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

sys.modules["tensorboardX"] = types.ModuleType("tensorboardX")
sys.modules["tensorboardX"].SummaryWriter = SummaryWriter

# torchvision's Omniglot checks the md5 of the official zips; this data root holds the extracted folders only
import torchvision.datasets  # noqa: E402

torchvision.datasets.Omniglot._check_integrity = lambda self: os.path.isdir(
    os.path.join(self.root, self._get_target_folder())
)

marks = []
mixture = importlib.import_module(spec["package"] + ".datasets.multimodal_few_shot").MultimodalFewShotDataset
_next = mixture.__next__


def _timed_next(self):
    start = time.perf_counter()
    try:
        return _next(self)
    finally:
        marks.append((start, time.perf_counter()))


mixture.__next__ = _timed_next
sys.argv = [os.path.join(spec["code"], "main.py"), *spec["argv"]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("RELEASED_MARKS " + json.dumps(marks), flush=True)
'''


# ------------------------------------------------------------------------------------------------ the data root
def write_omniglot(folder: Path, zips: list[Path], per_character: int) -> int:
    """Torchvision's Omniglot layout with 1623 character folders, the real small-set characters repeated.

    Returns how many distinct characters the zips hold. Each folder gets that character's first
    ``per_character`` drawers (all 20 at the published setup).
    """
    characters: dict[str, dict[str, bytes]] = {}  # "alphabet/characterNN" -> {file name: PNG bytes}
    for path in zips:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                parts = name.split("/")
                if len(parts) == 4 and parts[3].endswith(".png"):
                    characters.setdefault(f"{parts[1]}/{parts[2]}", {})[parts[3]] = archive.read(name)
    distinct = sorted(characters)  # Greek and Latin are in both small sets, with the same images
    tops = [top for top, count in OMNIGLOT_FOLDERS for _ in range(count)]
    for index, top in enumerate(tops):
        source = distinct[index % len(distinct)]
        alphabet, character = source.split("/")
        target = folder / top / f"{alphabet}_{index // len(distinct)}" / character
        target.mkdir(parents=True)
        for name in sorted(characters[source])[:per_character]:
            (target / name).write_bytes(characters[source][name])
    return len(distinct)


def write_miniimagenet(folder: Path, synthetic_root: Path, side: int, per_class: int) -> None:
    """kml's ``shapes`` images as mini-ImageNet JPEGs: ``images/`` with the split csv files (kml's converter) and
    ``<split>/<wnid>/`` (the released loaders), the same files hard-linked."""
    from PIL import Image

    from kml.data.modes import load_stores
    from kml.data.sources.miniimagenet import WNIDS

    (folder / "images").mkdir(parents=True)
    for split, wnids in WNIDS.items():
        store = load_stores(["shapes"], split, synthetic_root, side=side, progress=False)[0]
        rows = []
        for c, wnid in enumerate(wnids):
            (folder / split / wnid).mkdir(parents=True)
            for i, image in enumerate(store.class_images(c)[:per_class]):
                name = f"{wnid}{i + 1:08d}.jpg"
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / "images" / name)  # PIL's quality 75
                os.link(folder / "images" / name, folder / split / wnid / name)
                rows.append((name, wnid))
        with open(folder / f"{split}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([("filename", "label"), *rows])


def build_data(root: Path, modes: list[str], side: int, per_class: int, needed: int, zips: list[Path]) -> list[str]:
    """The data root of both sides; returns lines describing what each released loader and kml will read."""
    from kml.data.sources import prepare
    from kml.data.sources.prepare import format_summary

    notes = []
    if "omniglot" in modes:
        distinct = write_omniglot(root / "omniglot-py", zips, per_class)
        notes.append(f"omniglot: {distinct} distinct real characters ({', '.join(z.name for z in zips)}) repeated")
    if "miniimagenet" in modes:
        write_miniimagenet(root / "miniimagenet", root.parent / "synthetic", side, per_class)
        notes.append("miniimagenet: kml's synthetic shapes images under the 100 Ravi & Larochelle wnids")
    rows = prepare(
        modes,
        root,
        split_variant="omniglot=released" if "omniglot" in modes else None,
        mirrors=[DEAD_MIRROR],
        omniglot_side=side,
        progress=False,
    )
    return [*notes, *released_layout(root, modes, needed), *format_summary(rows).splitlines()]


def released_layout(root: Path, modes: list[str], needed: int) -> list[str]:
    """What the released loaders' globs find under ``root`` (their ``scripts/datasets/*.py``); refuses a layout
    whose meta-train classes hold fewer than ``needed`` images (their sampler would draw with replacement)."""
    found = {}
    if "omniglot" in modes:  # OmniglotMAMLSplit: glob(root + '/**/**/**'), the first 1100 for meta-train
        folders = glob.glob(str(root / "omniglot-py") + "/**/**/**")
        found["omniglot"] = (
            f"{len(folders)} character folders, meta-train the first",
            folders[:RELEASED_TRAIN_CHARACTERS],
        )
    if "miniimagenet" in modes:  # MiniimagenetMAMLSplit: glob(root + '/miniimagenet/train/**')
        found["miniimagenet"] = ("meta-train class folders:", glob.glob(str(root / "miniimagenet") + "/train/**"))
    lines = []
    for mode, (what, classes) in found.items():
        sizes = [len(glob.glob(folder + "/*")) for folder in classes]
        if len(classes) < 5 or min(sizes) < needed:
            raise SystemExit(f"released {mode}: {len(classes)} classes, the smallest {min(sizes, default=0)} images")
        lines.append(f"released {mode}: {what} {len(classes)}, {min(sizes)}-{max(sizes)} images each")
    return lines


# ------------------------------------------------------------------------------------------------ the released runs
def released_run(
    which: str, code: Path, args: argparse.Namespace, scratch: Path, data: Path, workers: int | None = None
) -> dict[str, Any]:
    """Run one released main.py in ``scratch`` (``./data`` -> the data root); seconds per timed meta-batch.
    ``workers`` (their ``--num-workers``) replaces their default of 4 DataLoader workers per mode."""
    info = RELEASED[which]
    steps = args.maml_steps if which == "mmaml" else args.steps
    folder = scratch / (which if workers is None else f"{which}-workers{workers}")
    folder.mkdir()
    (folder / "data").symlink_to(data)
    flags = [
        *info["flags"],
        "--multimodal_few_shot",
        *args.modes,
        "--num-batches",  # the README's count of tasks, here just enough for the warm-up and timed meta-batches
        str((args.warmup + steps) * 10),
        "--output-folder",
        info["folder"].format(modes=len(args.modes)),
        "--device",
        "cpu",
        *(["--num-workers", str(workers)] if workers is not None else []),
    ]
    spec = folder / "driver.json"
    spec.write_text(json.dumps({"code": str(code.resolve()), "package": info["package"], "argv": flags}))
    driver = folder / "driver.py"
    driver.write_text(DRIVER)
    command = [sys.executable, str(driver), str(spec)]
    started = time.perf_counter()
    with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
        done = subprocess.run(command, cwd=folder, env=RELEASED_ENV, stdout=out, stderr=err, timeout=args.timeout)
    wall = time.perf_counter() - started
    output = (folder / "stdout.txt").read_text()
    marks = next(
        (json.loads(line.split(" ", 1)[1]) for line in output.splitlines() if line.startswith("RELEASED_")), []
    )
    if done.returncode != 0 or len(marks) < args.warmup + steps + 1:
        tail = (folder / "stderr.txt").read_text()[-3000:]
        raise SystemExit(f"released {info['repo']} failed (exit {done.returncode}, {len(marks)} marks):\n{tail}")
    return {
        "code": f"released {info['repo']}",
        "method": info["method"] + (f" [--num-workers {workers}]" if workers is not None else ""),
        "precision": "fp32",
        "which": which,
        "base": workers is None,
        **timed(marks, args.warmup, steps, 10),
        "wall": wall,
        "command": f"cd {folder} && {shlex.join(command)}  # = python {code}/main.py {shlex.join(flags)}",
    }


def timed(marks: list[list[float]], warmup: int, steps: int, tasks: int) -> dict[str, Any]:
    """Seconds per step over steps ``warmup+1 .. warmup+steps`` from the (asked, got) times of each meta-batch."""
    starts = [start for start, _ in marks]
    total = starts[warmup + steps] - starts[warmup]
    waiting = sum(got - start for start, got in marks[warmup : warmup + steps])
    seconds = total / steps
    return {"steps": steps, "seconds": seconds, "tasks_per_s": tasks / seconds, "data_wait": waiting / total}


# ------------------------------------------------------------------------------------------------ kml's runs
def kml_worker(spec_path: Path) -> None:
    """Train each spec's recipe end to end in this process (its own, started by :func:`kml_runs`)."""
    from kml.training import launch
    from kml.training.trainer import Trainer

    for values in json.loads(spec_path.read_text()):
        if values["bf16"]:
            check_bf16("cpu")
        config = launch.config_from_values(launch.checked_values(values))
        trainer = Trainer.create(config, overwrite=True, progress=False)
        marks: list[tuple[float, float]] = []
        sample = trainer.sampler.sample

        def timed_sample(*args: Any, sample: Any = sample, marks: list = marks, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return sample(*args, **kwargs)
            finally:
                marks.append((start, time.perf_counter()))

        trainer.sampler.sample = timed_sample
        trainer.fit()
        result = {"marks": marks, "departures": trainer.config.data_departures or []}
        print("KML_RESULT " + json.dumps(result), flush=True)


def kml_runs(args: argparse.Namespace, scratch: Path, data: Path, setup: dict[str, Any]) -> list[dict[str, Any]]:
    """kml's rows: each recipe and precision in a process of its own (all in one with ``--smoke``)."""
    wanted = [r for which in ("kml", "mmaml") for r in RELEASED[which]["recipes"] if which in args.compare]
    jobs = []
    for recipe in wanted:
        maml = recipe.startswith("mmaml")
        steps = args.maml_steps if maml else args.steps
        for bf16 in (False, True) if args.bf16 else (False,):
            values = {
                "recipe": recipe,
                "modes": list(args.modes),
                "data_root": str(data),
                "train_dir": str(scratch / "kml-runs"),
                "run_name": f"{recipe}-{'bf16' if bf16 else 'fp32'}",
                "device": "cpu",
                "steps": args.warmup + steps + 1,  # the last one only marks the end of the timed ones
                "val_episodes": setup["meta_batch"],  # the end-of-run validation, after the timed steps
                "bf16": bf16,
                "allow_data_departure": True,
                "image_size": args.side,
                **{k: v for k, v in setup.items() if maml or k not in ("inner_steps", "eval_inner_steps")},
            }
            jobs.append((recipe, bf16, steps, values))
    groups = [jobs] if args.smoke else [[job] for job in jobs]
    rows = []
    for number, group in enumerate(groups):
        spec = scratch / f"kml-{number}.json"
        spec.write_text(json.dumps([values for *_, values in group]))
        command = [sys.executable, str(Path(__file__).resolve()), "--role", "kml", "--spec", str(spec)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        wall = time.perf_counter() - started
        results = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("KML_")]
        if done.returncode != 0 or len(results) != len(group):
            raise SystemExit(f"kml run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        for (recipe, bf16, steps, values), result in zip(group, results):
            flags = " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in values.items() if not isinstance(v, bool | list)
            )
            rows.append(
                {
                    "code": "kml",
                    "method": recipe,
                    "precision": "bf16" if bf16 else "fp32",
                    "which": "mmaml" if recipe.startswith("mmaml") else "kml",
                    **timed(result["marks"], args.warmup, steps, values["meta_batch"]),
                    "wall": wall,
                    "departures": result["departures"],
                    "command": f"{shlex.join(command)}  # = kml-train --modes {' '.join(args.modes)} {flags}"
                    f" --allow-data-departure{' --bf16' if bf16 else ''}",
                }
            )
    return rows


# ------------------------------------------------------------------------------------------------ the report
def print_table(rows: list[dict[str, Any]]) -> None:
    released = {row["which"]: row for row in rows if row.get("base")}
    header = f"{'code':<31}{'method':<53}{'precision':<11}{'steps':>6}{'s/step':>9}{'tasks/s':>9}{'data wait':>11}"
    print(header + f"{'kml / released':>16}")
    for row in rows:
        base = released.get(row["which"])
        ratio = f"{row['tasks_per_s'] / base['tasks_per_s']:.2f}x" if base and row["code"] == "kml" else "-"
        print(
            f"{row['code']:<31}{row['method']:<53}{row['precision']:<11}{row['steps']:>6}{row['seconds']:>9.3f}"
            f"{row['tasks_per_s']:>9.2f}{row['data_wait']:>10.0%} {ratio:>15}"
        )


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kml-code", type=Path, help="a clone of sutd-visual-computing-group/KML-Classification")
    parser.add_argument("--mmaml-code", type=Path, help="a clone of shaohua0116/MMAML-Classification")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="modes of both sides")
    parser.add_argument("--steps", type=int, default=20, help="timed steps, KML + ProtoNet rows")
    parser.add_argument("--maml-steps", type=int, default=5, help="timed steps, MMAML rows")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    parser.add_argument("--bf16", action="store_true", help=common.BF16_HELP + " (kml's rows also under it)")
    parser.add_argument("--omniglot-zips", type=Path, nargs="+", default=sorted(FIXTURE.glob("*.zip")))
    parser.add_argument(
        "--released-workers",
        type=int,
        nargs="*",
        default=[],
        help="also run the released codes with these --num-workers (their default, 4 per mode, is always run)",
    )
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per subprocess")
    parser.add_argument("--keep", type=Path, help="build everything in this new folder and keep it")
    parser.add_argument("--smoke", action="store_true", help="tiny, no released code, for CI (figures meaningless)")
    parser.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tuned = tune_cpu_allocator()  # kml's processes only: each released run is a fresh interpreter
    if args.role == "kml":
        kml_worker(args.spec)
        return
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the released codes save a checkpoint and log at their first step")
    if args.bf16:
        check_bf16("cpu")
    setup = {"meta_batch": 10}
    args.side, per_class = 84, 20
    if args.smoke:
        if args.kml_code or args.mmaml_code:
            parser.error("--smoke runs without the released codes")
        args.side, per_class, args.steps, args.maml_steps, args.warmup = 16, 4, 2, 2, 1
        setup = {"meta_batch": 2, "queries": 2, "base_channels": 4, "encoder_channels": 4}
        setup |= {"inner_steps": 1, "eval_inner_steps": 1}
    args.compare = ["kml", "mmaml"] if args.smoke else [w for w in RELEASED if getattr(args, f"{w}_code")]
    if not args.compare:
        parser.error("give --kml-code and/or --mmaml-code (or --smoke)")
    for which in args.compare:
        code = getattr(args, f"{which}_code")
        if code is not None and not (code / "main.py").is_file():
            parser.error(f"--{which}-code {code}: no main.py there")
    if args.keep:
        args.keep.mkdir(parents=True)
    scratch = (args.keep or Path(tempfile.mkdtemp(prefix="released-codes-"))).resolve()
    try:
        started = time.perf_counter()
        data = scratch / "data"
        notes = build_data(
            data, list(args.modes), args.side, per_class, 1 + setup.get("queries", 15), args.omniglot_zips
        )
        print(f"data root {data} ({time.perf_counter() - started:.0f} s):")
        print("\n".join("  " + line for line in notes))
        rows = []
        for which in args.compare if not args.smoke else []:
            for workers in [None, *args.released_workers]:
                rows.append(released_run(which, getattr(args, f"{which}_code"), args, scratch, data, workers))
        rows += kml_runs(args, scratch, data, setup)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    order = {"kml": 0, "mmaml": 1}
    rows.sort(key=lambda row: (order[row["which"]], row["code"] == "kml"))
    print(
        f"\nsetup: {' + '.join(args.modes)}, 5-way 1-shot {setup.get('queries', 15)}-query, {args.side}x{args.side}x3, "
        f"meta-batch {setup['meta_batch']}, {setup.get('base_channels', 32)} channels, cpu {cpu_model()}, "
        f"{torch.get_num_threads()} threads (kml), torch {torch.__version__}, Python {sys.version.split()[0]}, "
        f"kml allocator tuned {tuned}; warm-up {args.warmup} steps"
    )
    departures = sorted({d for row in rows for d in row.get("departures", [])})
    print(
        "data: image content stands in (Omniglot's small sets repeated, mini-ImageNet synthetic); kml's data checks "
        f"(allow_data_departure on): {'; '.join(departures) or 'no departure'}"
    )
    print_table(rows)
    if not any(row["code"] != "kml" for row in rows):
        print("(no released rows: --smoke, or no --kml-code / --mmaml-code)")
    print("\ncommands (wall seconds of each process):")
    for row in rows:
        print(f"  [{row['wall']:.0f} s] {row['command']}")


if __name__ == "__main__":
    main()
