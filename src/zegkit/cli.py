"""The `zegkit` command: segment images, list methods, and drive the other parts of the package.

    zegkit segment photo.jpg --classes "person; people, dog, grass, sky" --method sclip --out out/
    zegkit methods

`main(argv)` is callable from tests. Every flag that mirrors a library setting defaults to None and
is forwarded only when given, so each default lives once, in the library. Only the chosen
command's arguments are built, and heavy modules (torch, transformers) are imported inside the
commands, so `zegkit --help` and argument errors come back at once. Exit status: 0 done, 1 some
images skipped (`--skip-errors`), 2 bad input (with a message), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from zegkit.config import check_positive_finite

if TYPE_CHECKING:
    from zegkit.distributed import DistributedContext
    from zegkit.hardware import ThreadPlan

# OSError covers unwritable and full disks, FileNotFoundError and NotADirectoryError.
USER_ERRORS = (ValueError, OSError, RuntimeError)
EXIT_SKIPPED = 1  # some images were skipped (--skip-errors); the others' outputs are complete
EXIT_USAGE = 2  # bad input: the message says what and how to fix it
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT (128 + 2)


def parse_class_list(text: str) -> list[str]:
    """Split a --classes value: classes separated by ',', synonyms within a class by ';'."""
    return [entry.strip() for entry in text.split(",")]


def positive_finite(text: str) -> float:
    """An argparse type: a number > 0 that is neither NaN nor infinite (e.g. --logit-scale)."""
    try:
        value = float(text)
        check_positive_finite("the value", value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a positive finite number, got {text!r} (0 or less inverts or flattens the "
            "scores; NaN and infinity make them NaN)"
        ) from None
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`, so a bad count is refused while parsing, before
    any data or model loads."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _default(config: type, name: str) -> object:
    """The default of dataclass field `name`, for help texts (each default lives once)."""
    return next(f.default for f in fields(config) if f.name == name)


def _setting_flags() -> list[tuple[str, type, tuple | None, str, type | None]]:
    """Flags that set a library setting: (flag, type, choices, help, the dataclass holding the
    default, or None when the help says where the default comes from)."""
    from zegkit.hardware import PRECISIONS
    from zegkit.inference import InferenceConfig

    return [
        ("--precision", str, PRECISIONS, "compute precision; auto is bf16 autocast where the "
         "hardware runs it natively (GPUs with bf16, CPUs with AVX-512 BF16 or AMX), fp32 "
         "elsewhere (bf16 is emulated and several times slower on AVX2-only CPUs)",
         InferenceConfig),
        ("--compile", bool, None, "run the method's forward through torch.compile: compiled at "
         "the first image (35-40 s of CPU for a ViT-B/16), 0.7-0.9x the eager time per image "
         "after on a CPU; needs a C++ compiler there", InferenceConfig),
        ("--mode", str, ("slide", "whole"), "sliding window or one whole-image pass",
         InferenceConfig),
        ("--short-side", int, None, "resize so the short side has this many pixels",
         InferenceConfig),
        ("--crop", int, None, "window size", InferenceConfig),
        ("--stride", int, None, "window stride", InferenceConfig),
        ("--crop-batch", int, None, "crops per forward pass, bounds memory", InferenceConfig),
        ("--background-threshold", float, None,
         "pixels whose best class probability is below this get class 0", InferenceConfig),
        ("--refine", str, None, "refiners after the method's own: none, pamr, diffusion, or "
         "names joined by '+'", InferenceConfig),
        ("--proposals", str, None, "ClsCLIP+'s zoom-in: 'self' (boxes around the components of "
         "the method's own mask) or a COCO-style boxes JSON file", InferenceConfig),
        ("--logit-scale", positive_finite, None, "the method's softmax temperature over classes "
         "(default: the method's paper value)", None),
    ]


def add_model_arguments(parser: argparse.ArgumentParser, *, allow_all: bool = False) -> None:
    """Flags that choose the method, the CLIP weights and the inference protocol.

    With allow_all, --method also accepts "all" (every method, one after the other). Setting
    flags default to None and reach the library only when given (`user_settings`).
    """
    from zegkit.backbone import DEFAULT_MODEL
    from zegkit.methods import METHODS

    group = parser.add_argument_group("model and inference")
    group.add_argument(
        "--method",
        default="sclip",
        choices=[*sorted(METHODS), *(["all"] if allow_all else [])],
        help="segmentation method (default: sclip)",
    )
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"CLIP weights: hub id, local HF directory, OpenAI checkpoint file, or "
        f"zegkit/tiny-synthetic (default: {DEFAULT_MODEL})",
    )
    group.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer source for a bare checkpoint file (default: matching hub id)",
    )
    group.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    for flag, kind, choices, text, config in _setting_flags():
        if config is not None:
            text += f" (default: {_default(config, flag[2:].replace('-', '_'))})"
        if kind is bool:  # a switch: given (True) or not (None: the library's default)
            group.add_argument(flag, action="store_true", default=None, help=text)
        else:
            group.add_argument(flag, type=kind, choices=choices, default=None, help=text)
    group.add_argument(
        "--templates",
        default=None,
        help="prompt templates: imagenet, short, single, maskclip, zegclip-single, zegclip-multi "
        "(default: the method's own; imagenet for the training-free methods)",
    )
    group.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a trained method's weights, the .safetensors file `zegkit train` writes "
        "(default: none; required by the trained methods); with a fold set, {fold} in the path "
        "stands for each fold's number",
    )
    group.add_argument(
        "--set",
        dest="method_settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the method's config, repeatable, e.g. --set gaussian_std=3 or "
        "--set compensation=False for CLIPer without Stable Diffusion (default: none)",
    )


def parse_settings(items: Sequence[str]) -> dict[str, object]:
    """--set KEY=VALUE items as a dict; values are Python literals where they parse as one
    (3, 0.5, False, (8, 16)), else strings (model ids, paths).

    Raises:
        ValueError: an item without '='.
    """
    settings = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r} (e.g. --set gaussian_std=3).")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        settings[key.strip()] = value
    return settings


def user_settings(args: argparse.Namespace) -> dict[str, object]:
    """The settings the user gave: setting flags that were set, plus every --set KEY=VALUE.

    Raises:
        ValueError: a --set key that a flag sets too, to another value.
    """
    flags = {flag[2:].replace("-", "_") for flag, *_ in _setting_flags()}
    given = {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
    for key, value in parse_settings(args.method_settings).items():
        if key in given and given[key] != value:
            raise ValueError(f"--set {key}={value!r} contradicts --{key.replace('_', '-')}.")
        given[key] = value
    return given


def build_segmenter(args: argparse.Namespace):
    """A Segmenter from the flags of `add_model_arguments`, through the one builder."""
    from zegkit.segmenter import load_segmenter

    return load_segmenter(
        args.method,
        args.model,
        device=args.device,
        tokenizer=args.tokenizer,
        templates=args.templates,
        checkpoint=args.checkpoint,
        **user_settings(args),
    )


# ---- segment --------------------------------------------------------------------------------
def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    classes = parser.add_mutually_exclusive_group(required=True)
    classes.add_argument(
        "--classes",
        help="class names, comma-separated; synonyms within a class "
        'separated by ";", e.g. "person; people, dog, sky"',
    )
    classes.add_argument(
        "--classes-file",
        type=Path,
        help="file with one class per line (synonyms separated by ';' or ',')",
    )
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (created if missing; it may not be a file)")
    parser.add_argument("--skip-errors", action="store_true",
                        help="skip images that cannot be read, list them at the end and exit "
                        f"with status {EXIT_SKIPPED} (default: stop at the first)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="skip images whose three outputs are in --out already, to resume an "
                        "interrupted run (default: segment every image)")
    add_model_arguments(parser)


def read_classes(args: argparse.Namespace) -> list[str]:
    """The classes of --classes or --classes-file, checked (names, count) before any model loads.

    Raises:
        ValueError: empty, blank or duplicate names, or more classes than a label PNG holds.
    """
    from zegkit.text import parse_classes, read_class_file
    from zegkit.viz import MAX_LABEL_PNG_CLASSES

    classes = (
        read_class_file(args.classes_file) if args.classes_file else parse_class_list(args.classes)
    )
    parse_classes(classes)
    if len(classes) > MAX_LABEL_PNG_CLASSES:
        raise ValueError(
            f"{len(classes)} classes given; a label map (16-bit PNG) holds at most "
            f"{MAX_LABEL_PNG_CLASSES}. Split the vocabulary over several runs."
        )
    return classes


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Image paths of the files and folders given (folders: their images, not sub-folders).

    Raises:
        FileNotFoundError: an input does not exist, or a folder holds no images.
        ValueError: two inputs share a file name (their outputs would overwrite each other).
    """
    from zegkit.io import IMAGE_EXTENSIONS, list_images

    paths: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise FileNotFoundError(f"Input {str(item)!r} does not exist.")
        if not item.is_dir():
            paths.append(item)
            continue
        try:
            paths.extend(list_images(item))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"Folder {str(item)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                "sub-folders are not searched: pass each one as an input."
            ) from None
    stems = [path.stem for path in paths]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise ValueError(
            f"Several inputs are named {repeated}; their outputs would overwrite each other. "
            "Rename them or segment them in separate runs."
        )
    return paths


def readable_images(paths: Sequence[Path], *, skip_errors: bool = False,
                    ) -> tuple[dict[Path, tuple[int, int]], list[tuple[Path, str]]]:
    """({readable path: its (height, width)}, [(path, why)] of the others), from each file's
    header.

    Raises:
        ValueError: a file that is not a readable image, unless `skip_errors`.
    """
    from zegkit.io import check_image_file

    readable, skipped = {}, []
    for path in paths:
        try:
            readable[path] = check_image_file(path)
        except (ValueError, OSError) as error:
            if not skip_errors:
                raise
            skipped.append((path, str(error)))
    return readable, skipped


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Expand files and folders into image paths, checking every one is readable first.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: a file is not a readable image, or two inputs share a file name (their outputs
            would overwrite each other).
    """
    return list(readable_images(expand_inputs(inputs))[0])


def check_output_folder(folder: Path, flag: str) -> None:
    """Refuse, before any work, an output folder that is a file, lies under a file, or cannot be
    written (read-only file system, no permission). A missing folder is fine: it is created.

    Raises:
        ValueError: naming `flag`, the folder and what is wrong.
    """
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is a file, not a folder; give a folder path (it is "
                         "created if missing).")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {folder} lies under {existing}, which is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder}: {existing} cannot be written (read-only file system "
                         "or no permission); choose another folder.")


def check_output_file(path: Path, flag: str) -> None:
    """Refuse, before any work, an output file path that is a folder or cannot be written.

    Raises:
        ValueError: naming `flag`, the path and what is wrong.
    """
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file path, e.g. "
                         f"{path / 'result.json'}.")
    check_output_folder(path.parent, flag)


def check_outputs_spare_inputs(images: Sequence[Path], out: Path) -> None:
    """Refuse a run in which an image's output would replace an input (a user's own
    x_labels.png beside x.png, or outputs of an earlier run in the input folder).

    Raises:
        ValueError: naming the output, the image it belongs to, and the input it would replace.
    """
    from zegkit.segmenter import output_paths

    inputs = {_file_id(path): path for path in images}
    for image in images:
        for kind, target in output_paths(out, image.stem).items():
            clash = inputs.get(_file_id(target)) if target.exists() else None
            if clash is not None:
                raise ValueError(
                    f"The {kind} output of {image} would be written over the input {clash}. "
                    "Choose an --out folder that holds none of the inputs (outputs of an "
                    "earlier run beside the images are read as inputs too)."
                )


def _file_id(path: Path) -> tuple[int, int]:
    """(device, inode): one file whatever the path (links, relative parts)."""
    status = path.stat()
    return status.st_dev, status.st_ino


def has_outputs(out: Path, stem: str) -> bool:
    """Whether the three outputs of `stem` are in `out` (written as one unit, so complete)."""
    from zegkit.segmenter import output_paths

    return all(path.is_file() for path in output_paths(out, stem).values())


def check_memory(args: argparse.Namespace, sizes: dict[Path, tuple[int, int]],
                 classes: Sequence[str]) -> None:
    """Refuse, before the model loads, images whose segmentation cannot fit in the memory this
    machine has free (`zegkit.memory`).

    Raises:
        RuntimeError: naming the image, what it needs at least, what is free, what would fit.
        ValueError: an inference setting of the wrong type or range.
    """
    from zegkit.memory import available_memory, check_segment_fits
    from zegkit.segmenter import inference_config, resolve_settings

    config = inference_config(resolve_settings(args.method, None, user_settings(args))[1])
    check_segment_fits(sizes, config, len(classes), available_memory())


def run_segment(args: argparse.Namespace) -> int:
    """Check everything that can be checked, load the model, segment each image (torch's
    threads on the usable cores, following other processes' load: `planned_threads`)."""
    from zegkit.hardware import planned_threads

    classes = read_classes(args)
    check_output_folder(args.out, "--out")
    paths = expand_inputs(args.inputs)
    check_outputs_spare_inputs(paths, args.out)
    try:
        sizes, skipped = readable_images(paths, skip_errors=args.skip_errors)
    except ValueError as error:
        raise ValueError(f"{error} (--skip-errors skips such files)") from None
    images = list(sizes)
    if args.skip_existing:
        todo = [path for path in images if not has_outputs(args.out, path.stem)]
        print(f"Skipping {len(images) - len(todo)} image(s) whose outputs exist in {args.out}")
        images = todo
    check_memory(args, {path: sizes[path] for path in images}, classes)
    with planned_threads(num_workers=0, device=args.device):
        segmenter = build_segmenter(args)
        segmenter.set_vocabulary(classes)
        failed = segment_images(segmenter, images, args.out, skip_errors=args.skip_errors)
    print(f"Segmented {len(images) - len(failed)} image(s) into {args.out}")
    skipped += failed
    if skipped:
        print(f"Skipped {len(skipped)} image(s) that could not be read:", file=sys.stderr)
        for path, why in skipped:
            print(f"  {path}: {why}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


def segment_images(segmenter, images: Sequence[Path], out: Path, *, skip_errors: bool,
                   ) -> list[tuple[Path, str]]:
    """Segment and save each image (its three outputs as one unit); returns the skipped ones.

    On Ctrl-C, says how far it got and re-raises: every image saved so far is complete, the one
    in progress left nothing (see `Segmentation.save`).

    Raises:
        ValueError: an image that cannot be decoded, unless `skip_errors`.
    """
    from tqdm import tqdm

    from zegkit.hardware import follow_load
    from zegkit.io import load_image

    skipped: list[tuple[Path, str]] = []
    saved = 0
    try:
        with tqdm(images, unit="image", disable=len(images) < 2) as progress:
            for path in progress:
                progress.set_postfix_str(path.name)
                try:
                    image = load_image(path)  # damage the header check could not see
                except ValueError as error:
                    if not skip_errors:
                        raise ValueError(
                            f"{error} The {saved} image(s) before it were saved; --skip-errors "
                            "skips such files, --skip-existing keeps the saved ones."
                        ) from None
                    skipped.append((path, str(error)))
                    continue
                written = segmenter.segment(image).save(out, path.stem, image)
                saved += 1
                follow_load()
                if len(images) < 2:
                    print("\n".join(str(p) for p in written.values()))
    except KeyboardInterrupt:
        print(f"Interrupted after {saved} of {len(images)} image(s); their outputs are complete "
              "and nothing of the next was written. Rerun with --skip-existing to go on.",
              file=sys.stderr)
        raise
    return skipped


# ---- eval -----------------------------------------------------------------------------------
def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from zegkit.data.datasets import DATASETS

    parser.add_argument(
        "--dataset", required=True, choices=sorted(DATASETS), help="benchmark layout to read"
    )
    parser.add_argument("--data-root", type=Path, required=True, help="the dataset's root folder")
    parser.add_argument("--split", default="val", help="dataset split (default: val)")
    parser.add_argument(
        "--protocol",
        default=None,
        help="named evaluation protocol, or a fold set of 1-way episodes (pascal-5i, coco-20i, "
        "synthetic-4x5) (default: the dataset's; see zegkit.data.protocols)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="result JSON (default: results/<dataset>_<method>.json)",
    )
    parser.add_argument(
        "--progress-file",
        type=Path,
        default=None,
        help="progress file; rerunning the same command resumes from it (default: none)",
    )
    parser.add_argument(
        "--progress-every",
        type=int_at_least(1),
        default=50,
        help="images between progress-file updates (default: 50)",
    )
    parser.add_argument(
        "--num-workers", type=int_at_least(0), default=None,
        help="image-decoding worker processes, each on one thread (default: 0 for a model on "
        "the CPU, 2 on a GPU; see zegkit.hardware.default_eval_workers)"
    )
    parser.add_argument(
        "--threads", type=int_at_least(1), default=None,
        help="torch threads running the model (default: OMP_NUM_THREADS or MKL_NUM_THREADS when "
        "set, else the usable cores (CPU affinity, cgroup quota) minus --num-workers, at least 1)"
    )
    parser.add_argument(
        "--limit", type=int_at_least(1), default=None,
        help="evaluate only the first N images (default: all)"
    )
    parser.add_argument(
        "--bootstrap",
        type=int_at_least(0),
        default=0,
        help="resamples of the images for 95%% intervals of mIoU; with --method all the result "
        "keeps per-image counts for zegkit.evaluate.compare_results (default: 0, none)",
    )
    add_model_arguments(parser, allow_all=True)


def run_eval(args: argparse.Namespace) -> None:
    from zegkit.data.protocols import fold_protocols
    from zegkit.distributed import init_distributed
    from zegkit.hardware import check_device, planned_threads

    output = args.output or Path("results") / f"{args.dataset}_{args.method}.json"
    check_output_file(output, "--output")
    if args.progress_file is not None:
        check_output_file(args.progress_file, "--progress-file")
    check_device(args.device)
    context = init_distributed(args.device)
    episodes = args.protocol is not None and fold_protocols(args.protocol)  # no image loader
    with planned_threads(0 if episodes else args.num_workers, args.threads,
                      context.device) as plan:
        _evaluate(args, output, context, plan)


def _evaluate(args: argparse.Namespace, output: Path, context: DistributedContext,
              plan: ThreadPlan) -> None:
    """`zegkit eval` once its output is checked and its threads (`plan`) are set."""
    from zegkit.evaluate import (
        format_comparison,
        format_table,
        format_throughput,
        run_eval,
        run_eval_all,
    )

    common = dict(
        model=args.model,
        device=args.device,
        tokenizer=args.tokenizer,
        templates=args.templates,
        protocol=args.protocol,
        split=args.split,
        output=output,
        progress_file=args.progress_file,
        progress_every=args.progress_every,
        checkpoint=args.checkpoint,
        num_workers=plan.num_workers,
        limit=args.limit,
        bootstrap=args.bootstrap,
        progress=context.is_main,
        **user_settings(args),
    )
    if args.method == "all":
        results = run_eval_all(args.dataset, args.data_root, **common)
        report = format_comparison(results)
    else:
        results = {args.method: run_eval(args.dataset, args.data_root, method=args.method,
                                         **common)}
        report = format_table(results[args.method])
    if context.is_main:
        print(report)
        for method, result in results.items():
            if "throughput" in result:
                print(f"{method}: {format_throughput(result['throughput'])}; threads from "
                      f"{plan.threads_from}")
        print(f"Saved {output}")


# ---- methods --------------------------------------------------------------------------------
def run_methods(args: argparse.Namespace) -> None:
    from zegkit.methods import list_methods
    from zegkit.refine import list_refiners

    methods = list_methods()
    width = max(map(len, methods))
    print("methods:")
    for name, description in methods.items():
        print(f"  {name:<{width}}  {description}")
    print("refiners (--refine):")
    for name, description in list_refiners().items():
        print(f"  {name:<{width}}  {description}")


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    from zegkit.data import synthetic

    synthetic.add_arguments(parser)


def run_synth(args: argparse.Namespace) -> None:
    from zegkit.data import synthetic

    synthetic.run(args)


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    from zegkit.train import pretrain_clip

    pretrain_clip.add_arguments(parser)


def run_pretrain(args: argparse.Namespace) -> None:
    from zegkit.train import pretrain_clip

    pretrain_clip.run(args)


# ---- train ----------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from zegkit.train.recipes import RECIPES

    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES),
                        help="a paper's released training configuration (zegkit.train.recipes)")
    parser.add_argument("--method", default=None,
                        help="the method to train; must be the recipe's (a check, default: it)")
    parser.add_argument("--out", type=Path, required=True, help="the run folder")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="the training dataset's root (default: none, for the generated "
                        "synthetic proving ground)")
    parser.add_argument("--model", default=None,
                        help="the frozen CLIP (default: the recipe's)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--set", dest="recipe_settings", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a recipe field (iterations=100, lr=1e-4) or, for other "
                        "keys, a method setting (prompt_tokens=5); repeatable (default: none)")
    parser.add_argument("--max-steps", type=int_at_least(1), default=None,
                        help="stop after N steps; the schedule stays the recipe's (default: all)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out exactly where its last checkpoint left it")
    parser.add_argument("--num-workers", type=int_at_least(0), default=2,
                        help="data-loading worker processes per process (default: 2)")
    parser.add_argument("--log-every", type=int_at_least(1), default=10,
                        help="steps between log lines (default: 10)")


def run_train(args: argparse.Namespace) -> None:
    from zegkit.train.loop import train
    from zegkit.train.recipes import get_recipe, with_overrides

    recipe = get_recipe(args.recipe)
    if args.device is not None:
        from zegkit.hardware import check_device

        check_device(args.device)
    if args.method is not None and args.method != recipe.method:
        raise ValueError(f"Recipe {recipe.name!r} trains {recipe.method!r}, not {args.method!r}; "
                         "pick a recipe of that method.")
    overrides = parse_settings(args.recipe_settings)
    if args.model is not None:
        overrides["model"] = args.model
    recipe = with_overrides(recipe, overrides)
    result = train(recipe, args.out, data_root=args.data_root, device=args.device,
                   max_steps=args.max_steps, resume=args.resume, num_workers=args.num_workers,
                   log_every=args.log_every)
    from zegkit.distributed import rank_and_world

    if rank_and_world()[0] == 0:
        print(f"step {result['step']}, {result['images_per_second']} images/s; "
              f"checkpoint {args.out / 'last.safetensors'}")


# ---- classify -------------------------------------------------------------------------------
def add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    from zegkit import classify

    classify.add_arguments(parser)


def run_classify(args: argparse.Namespace) -> None:
    from zegkit import classify

    classify.run(args)


# ---- serve ----------------------------------------------------------------------------------
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from zegkit import serve

    serve.add_arguments(parser)


def run_serve(args: argparse.Namespace) -> None:
    from zegkit import serve

    serve.run(args)


# ---- bench ----------------------------------------------------------------------------------
def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from zegkit import bench

    bench.add_arguments(parser)


def run_bench(args: argparse.Namespace) -> None:
    from zegkit import bench

    bench.run(args)


Command = tuple[str, Callable[[argparse.ArgumentParser], None] | None, Callable]
COMMANDS: dict[str, Command] = {
    "segment": ("segment images with any class names", add_segment_arguments, run_segment),
    "eval": (
        "evaluate methods on a benchmark (mIoU; seen/unseen/harmonic)",
        add_eval_arguments,
        run_eval,
    ),
    "classify": ("zero-shot image classification with any class names (PACL: its pooled "
                 "compatibility)", add_classify_arguments, run_classify),
    "methods": ("list the segmentation methods and refiners", None, run_methods),
    "synth": (
        "write a synthetic proving-ground dataset (images, masks, captions, split)",
        add_synth_arguments,
        run_synth,
    ),
    "pretrain-clip": (
        "train the tiny CLIP of the proving ground on synthetic scenes",
        add_pretrain_arguments,
        run_pretrain,
    ),
    "train": (
        "train a method (ZegCLIP, ...) on a frozen CLIP, one process or torchrun",
        add_train_arguments,
        run_train,
    ),
    "serve": (
        "a browser page: segment any image with any class names, compare two methods",
        add_serve_arguments,
        run_serve,
    ),
    "bench": (
        "seconds per image of each method vs the plain CLIP forward on the same crops, and "
        "peak memory",
        add_bench_arguments,
        run_bench,
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `zegkit` parser; only `command`'s arguments are built (they import torch), so the
    command list and its help need no heavy import."""
    parser = argparse.ArgumentParser(
        prog="zegkit", description="Zero-shot semantic segmentation with CLIP."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if add_arguments is not None and name == command:
            add_arguments(sub)
    return parser


# Commands that run a model, under `zegkit.hardware.keep_freed_memory` (15-20% less CPU time).
MODEL_COMMANDS = ("segment", "eval", "classify", "pretrain-clip", "train", "serve", "bench")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `zegkit` command; returns the exit status (EXIT_* above)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((item for item in argv if not item.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    if args.command in MODEL_COMMANDS:
        from zegkit.hardware import keep_freed_memory

        keep_freed_memory()
    try:
        status = COMMANDS[args.command][2](args)
    except KeyboardInterrupt:
        print(f"zegkit {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as error:
        print(f"zegkit {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
