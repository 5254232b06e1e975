#!/usr/bin/env python
"""Continual learning of a CLIP model: SPU against its peers on a class-incremental sequence.

With no arguments it runs offline on the embedded default: the small CLIP shipped with spu_peft (pretrained by
the project on digits, letters, shapes and a few animals) learning Animal-Shape silhouettes as 5 tasks of 2
classes, with held-out pretraining images as the control set. The paper's setting (a GPU and the Hub):

    accelerate launch benchmarks/cl_sequence.py --protocol paper --model openai/clip-vit-base-patch16 \
        --dataset <hub id | image folder | save_to_disk folder> --control-dataset <...> --num-tasks 10

The engine is `spu_peft.continual` (`load_sequence_data`, `run_sequence`); this script is their flags. Results
(JSON, CSV, a markdown table in the paper's Acc / F / C form, PNG plots) land in `--output-dir` (default
`results/<sequence>/`); `--resume` continues a killed run and refuses one made with other flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from pathlib import Path

import torch
from numerics_flag import numerics_asked  # imports nothing that computes

if not torch.cuda.is_available():  # DeepSpeed (if installed) would warn that it falls back to the CPU in every run
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
DEFAULT_NUMERICS = "reproducible"  # `--numerics`: every x86-64 CPU gives the same numbers
if __name__ == "__main__" and numerics_asked(sys.argv[1:], DEFAULT_NUMERICS) == "reproducible":  # before the imports
    os.environ.update(MKL_CBWR="COMPATIBLE", ATEN_CPU_CAPABILITY="avx2")

import datasets  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402

from spu_peft.continual import (  # noqa: E402
    CAPTION_TEMPLATE,
    NUMERICS_MODES,
    PROTOCOLS,
    TARGET_LAYERS,
    DataSource,
    FingerprintMismatchError,
    get_method,
    load_sequence_data,
    pin_cpu_numerics,
    protocol_settings,
    registered_methods,
    run_sequence,
)
from spu_peft.continual.checkpoint import OutputDirBusyError, claim_output_dir  # noqa: E402
from spu_peft.continual.data import check_modules_to_save  # noqa: E402
from spu_peft.continual.fingerprint import DIFFERENCE_FLAGS, check_fingerprint  # noqa: E402
from spu_peft.continual.methods import METHOD_GROUPS, parse_method_options, resolve_methods  # noqa: E402
from spu_peft.continual.sources import EMBEDDED, load_clip  # noqa: E402
from spu_peft.continual.workers import is_library_refusal  # noqa: E402

logger = get_logger(__name__)

# `--quick`'s values, used only for the flags the user did not give.
QUICK = dict(num_tasks=2, epochs=1, max_train_per_task=64, max_test_per_task=32, max_control=192, buffer_size=32)
# Flags that fill `SequenceSettings` fields of the same name (default None: the protocol's value).
SETTINGS_FLAGS = {
    "num_tasks": (int, "Number of class-incremental tasks (embedded: 5)."),
    "epochs": (int, "Epochs per task (embedded: 3, paper: 10)."),
    "batch_size": (int, "Current-task images per step, per process (embedded: 32, paper: 128)."),
    "replay_batch_size": (int, "Replay images joined to each step (embedded: 32, paper: 128)."),
    "buffer_size": (int, "Task-balanced replay buffer size (embedded: 200, paper: 2000)."),
    "replay_from_epoch": (int, "First epoch (0-based) of each task with replay (embedded: 0, paper: 1)."),
    "eval_batch_size": (int, "Evaluation batch size (256)."),
    "lr": (float, "One learning rate for all methods (embedded: each method's default_lr; paper: 7.5e-6)."),
    "weight_decay": (float, "AdamW weight decay (embedded: 0.01, paper: 0.2)."),
    "lr_schedule": (str, "constant (embedded) or reference_cosine (paper)."),
    "loss": (str, "caption (embedded: each image against one caption per seen class) or clip (paper: in-batch)."),
    "score_batch_size": (int, "Batch size of selections and importances (embedded: --batch-size, paper: 128)."),
    "max_train_per_task": (int, "Cap on training images per task."),
    "max_test_per_task": (int, "Cap on test images per task."),
    "max_control": (int, "Cap on control-set images (a seeded sample)."),
    "seed": (int, "Seed of class order, data order, buffer, supports; picks the embedded model (0)."),
    "max_reference": (int, "Cap on reference images for zscl and lora_ewc (1024)."),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flagged(message: str) -> str:
    """A library message with `field` names written as the flags that set them."""
    return re.sub(r"`(\w+)`", lambda m: _flag(m.group(1)), message)


def build_parser() -> argparse.ArgumentParser:
    """The script's flags."""
    listed = dict.fromkeys([*METHOD_GROUPS["paper"], *registered_methods()])  # the paper's order, then users' own
    methods = "\n".join(f"  {name:<16}{get_method(name).description}" for name in listed)
    groups = "\n".join(f"  {name:<16}{', '.join(members)}" for name, members in METHOD_GROUPS.items())
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog=f"methods (--methods):\n{methods}\n\ngroups:\n{groups}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--protocol", default="embedded", choices=sorted(PROTOCOLS), help="Settings to start from.")
    parser.add_argument("--model", default=EMBEDDED, help="'embedded' (default), a hub id or a local CLIPModel folder.")
    parser.add_argument(
        "--dataset",
        default=EMBEDDED,
        help="'embedded' (Animal-Shape), a hub id, an image folder or a save_to_disk one.",
    )
    parser.add_argument("--image-column", default="image", help="Image column of --dataset.")
    parser.add_argument("--label-column", default="label", help="Label column of --dataset (ClassLabel or int).")
    parser.add_argument("--class-names", default=None, help="Comma-separated class names, if the labels have none.")
    parser.add_argument("--train-split", default="train", help="Training split of --dataset.")
    parser.add_argument("--test-split", default="test", help="Test split; split off the training data if absent.")
    _add_side_dataset_flags(
        parser,
        "control",
        "control",
        "Control set from the pretraining domain: 'embedded' (default with the embedded model), a hub id or folder; "
        "'none' to skip.",
    )
    parser.add_argument(
        "--methods",
        default="default",
        help="Comma-separated registered methods or groups: 'default' (SPU and the dense, LoRA and random baselines: "
        "seven), 'paper' (those and the eight peers: fifteen).",
    )
    parser.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="METHOD.OPTION=VALUE",
        help="Change a method's option, e.g. spu_replay.density=0.05, spu.score=fisher, lora_replay.rank=8, "
        "lwf.strength=0.1 (repeatable; each method's options: docs/peers.md).",
    )
    _add_side_dataset_flags(
        parser,
        "reference",
        "train",
        "Reference image-caption data for zscl and lora_ewc: 'embedded' (default with the embedded model: "
        "pretraining images, none of the control set), a hub id or folder with class labels; 'none' to skip.",
    )
    parser.add_argument("--target-layers", default="fc1", choices=sorted(TARGET_LAYERS), help="Layers adapted.")
    parser.add_argument(
        "--modules-to-save",
        default="default",
        help="Modules SPU adapters train densely: 'default' (CLIP: visual_projection), 'none', or names.",
    )
    for name, (kind, text) in SETTINGS_FLAGS.items():
        parser.add_argument(_flag(name), type=kind, default=None, help=text)
    parser.add_argument("--lr-sweep", action="store_true", help="Also run every method over its grid of rates.")
    parser.add_argument(
        "--numerics",
        default=DEFAULT_NUMERICS,
        choices=NUMERICS_MODES,
        help="reproducible: pin MKL, ATen and convolutions so every x86-64 CPU gives the same numbers; native: "
        "the libraries' fastest paths for this CPU.",
    )
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (embedded model: 1).")
    parser.add_argument("--workers", type=int, default=None, help="Forked one-thread CPU processes (default: cores).")
    parser.add_argument("--output-dir", default=None, help="Where results go (default results/<sequence>/).")
    parser.add_argument("--cache-dir", default=None, help="Cache of pretrained embedded models (other seeds).")
    parser.add_argument("--resume", action="store_true", help="Continue a killed run (with the same flags).")
    parser.add_argument("--quick", action="store_true", help="A smoke run: 2 tasks, 1 epoch, 64 images per task.")
    return parser


def _add_side_dataset_flags(parser: argparse.ArgumentParser, kind: str, split: str, text: str) -> None:
    """`--<kind>-dataset`, `-split`, `-image-column` and `-label-column` of a dataset beside the sequence's."""
    parser.add_argument(f"--{kind}-dataset", default=None, help=text)
    parser.add_argument(f"--{kind}-split", default=split, help=f"Split of --{kind}-dataset to use.")
    for column in ("image", "label"):
        parser.add_argument(f"--{kind}-{column}-column", default=column, help=f"{column.title()} column of it.")
    parser.add_argument(f"--{kind}-class-names", default=None, help="Comma-separated names of its integer labels.")


def _side_source(args: argparse.Namespace, kind: str) -> DataSource | None:
    """The dataset `--<kind>-dataset` and its split and column flags name (None for 'none')."""
    name = getattr(args, f"{kind}_dataset")
    if name == "none":
        return None
    split, image, label = (getattr(args, f"{kind}_{flag}") for flag in ("split", "image_column", "label_column"))
    return DataSource(name, split, image, label, _names(getattr(args, f"{kind}_class_names")))


def _names(value: str | None) -> tuple[str, ...] | None:
    """The class names of a comma-separated flag (None: the dataset's own)."""
    return tuple(name.strip() for name in value.split(",")) if value else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked: every bad value stops here, before any work."""
    parser = build_parser()
    args = parser.parse_args(argv)

    given = {name: getattr(args, name) for name in SETTINGS_FLAGS if getattr(args, name) is not None}
    quick = {k: v for k, v in QUICK.items() if k not in given} if args.quick else {}
    if args.quick and "replay_from_epoch" not in given:  # a smoke run's few epochs still reach replay
        epochs = given.get("epochs", QUICK["epochs"])
        start = PROTOCOLS.get(args.protocol, {}).get("replay_from_epoch", 0)
        quick["replay_from_epoch"] = max(0, min(start, epochs - 1))
    names = [n.strip() for n in args.modules_to_save.split(",") if n.strip()]
    if not names:
        parser.error("--modules-to-save is empty; use 'default', 'none' or module names")
    keyword = names[0].lower() if len(names) == 1 else None
    modules_to_save = None if keyword == "default" else () if keyword == "none" else tuple(names)
    templates = (CAPTION_TEMPLATE,)
    if args.model == EMBEDDED:
        from spu_peft.embedded import CAPTION_TEMPLATES  # the embedded data build on first use: imported when asked

        templates = tuple(CAPTION_TEMPLATES)
    try:
        args.settings = protocol_settings(
            args.protocol,
            **quick,
            **given,
            target_modules=TARGET_LAYERS[args.target_layers],
            modules_to_save=modules_to_save,
            caption_template=CAPTION_TEMPLATE,
            templates=templates,
            numerics=args.numerics,
        )
    except ValueError as error:
        parser.error(_flagged(str(error)))
    _check_methods(args, parser)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.num_threads is not None and args.num_threads < 1:  # 0 would be read as unset, a negative count crash
        parser.error(f"--num-threads must be at least 1 (or unset), got {args.num_threads}")
    if args.control_dataset is None:
        args.control_dataset = EMBEDDED if args.model == EMBEDDED else "none"
    if args.output_dir is None:
        name = "animal-shapes" if args.dataset == EMBEDDED else Path(args.dataset.rstrip("/")).name
        suffix = ("-paper" if args.protocol == "paper" else "") + ("-quick" if args.quick else "")
        args.output_dir = os.path.join("results", f"{name}-{args.settings.num_tasks}tasks{suffix}")
    return args


def _check_methods(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`--methods`, `--method-option` and the reference data the methods need."""
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = (*METHOD_GROUPS, *registered_methods())
    unknown = [m for m in args.methods if m not in known]
    if unknown or not args.methods:
        parser.error(f"unknown method(s) {unknown} in --methods; choose from {', '.join(known)}")
    if args.reference_dataset is None:
        args.reference_dataset = EMBEDDED if args.model == EMBEDDED else "none"
    try:
        args.settings = dataclasses.replace(args.settings, method_options=parse_method_options(args.method_option))
        has_reference = args.reference_dataset != "none"
        methods = resolve_methods(args.methods, args.settings, has_reference=has_reference, only_options_of_these=True)
    except ValueError as error:
        parser.error(_flagged(str(error)).replace("--method-options", "--method-option"))
    args.needs_reference = any(m.needs_reference for m in methods)


# ---- main ---------------------------------------------------------------------------------------------------------


# What a fingerprint difference means in flags (settings fields are their flags, see SETTINGS_FLAGS).
def _refusal(error: FingerprintMismatchError) -> str:
    lines = [f"  {DIFFERENCE_FLAGS.get(k, _flag(k))}: recorded {a!r}, now {b!r}" for k, a, b in error.differences]
    head = "error: --resume: the run in this folder was made with other flags (rerun without --resume, or use "
    return head + "another --output-dir):\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return _run(args)
    except FingerprintMismatchError as error:
        raise SystemExit(_refusal(error)) from None
    except (OutputDirBusyError, ValueError) as error:  # the library's refusals, each naming what to fix
        if isinstance(error, ValueError) and not is_library_refusal(error, __name__):
            raise  # a method's or its hooks' own code, or a library the engine called: the traceback says where
        raise SystemExit(f"error: {_flagged(str(error))}") from None


def _run(args: argparse.Namespace) -> dict:
    # 1. numerics, processes, and the output folder (claimed and checked before any model or data is loaded)
    if args.settings.numerics == "reproducible":
        pin_cpu_numerics()
    if args.num_threads or args.model == EMBEDDED:
        # With tiny matrices, OpenMP threads mostly wait on each other; one thread is also reproducible.
        torch.set_num_threads(args.num_threads or 1)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if args.workers is None:
        on_one_cpu_process = accelerator.device.type == "cpu" and accelerator.num_processes == 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.workers = cores if args.model == EMBEDDED and on_one_cpu_process else 1
    elif args.workers > 1 and (accelerator.device.type != "cpu" or accelerator.num_processes > 1):
        raise SystemExit("error: --workers > 1 runs on the CPU of a single process; drop it or --num_processes")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    datasets.disable_progress_bars()
    if accelerator.is_main_process:  # a second run into a busy folder stops here, within seconds
        claim_output_dir(args.output_dir)
    check_fingerprint(args.output_dir, {"settings": args.settings.to_dict()}, args.resume, write=False)

    # 2. the foundation model and the data
    if args.model == EMBEDDED:
        from spu_peft.embedded import load_embedded_clip

        with accelerator.main_process_first():
            base, processor = load_embedded_clip(cache_dir=args.cache_dir, seed=args.settings.seed)
    else:
        base, processor = load_clip(args.model)
    check_modules_to_save(base, args.settings)
    data = load_sequence_data(  # every problem of the data raises here, before training
        processor,
        args.settings,
        DataSource(args.dataset, args.train_split, args.image_column, args.label_column),
        test_split=args.test_split,
        class_names=_names(args.class_names),
        control=_side_source(args, "control"),
        reference=_side_source(args, "reference") if args.needs_reference else None,
        accelerator=accelerator,
    )
    logger.info(
        f"{len(data.class_names)} classes in {len(data.tasks)} tasks {data.task_class_names()}; "
        f"{sum(map(len, data.train_indices))} training images; control set: "
        f"{0 if data.control is None else len(data.control)} images",
        main_process_only=True,
    )

    # 3. every method (and learning rate) over the sequence
    extra = {"protocol": args.protocol, "model": args.model, "dataset": args.dataset, "quick": args.quick}
    extra.update(control_dataset=args.control_dataset, command=" ".join(sys.argv))
    methods = run_sequence(
        base,
        processor,
        data,
        args.settings,
        output_dir=args.output_dir,
        methods=args.methods,
        lr_sweep=args.lr_sweep,
        resume=args.resume,
        workers=args.workers,
        accelerator=accelerator,
        extra_config=extra,
    )
    if accelerator.is_main_process:
        print((Path(args.output_dir) / "results.md").read_text())
        print(f"Results in {args.output_dir}/ (results.json, results.csv, results.md, accuracy.png, acc_matrix.png)")
    return methods


if __name__ == "__main__":
    main()
