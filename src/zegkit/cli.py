"""The `zegkit` command: segment images, list methods, and drive the other parts of the package.

    zegkit segment photo.jpg --classes "person; people, dog, grass, sky" --method sclip --out out/
    zegkit methods

`main(argv)` is callable from tests. Every flag that mirrors a library setting defaults to None and
is forwarded only when given, so each default lives once, in the library.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)


def parse_class_list(text: str) -> list[str]:
    """Split a --classes value: classes separated by ',', synonyms within a class by ';'."""
    return [entry.strip() for entry in text.split(",")]


def _default(config: type, name: str) -> object:
    """The default of dataclass field `name`, for help texts (each default lives once)."""
    return next(f.default for f in fields(config) if f.name == name)


def _setting_flags() -> list[tuple[str, type, tuple | None, str, type | None]]:
    """Flags that set a library setting: (flag, type, choices, help, the dataclass holding the
    default, or None when the help says where the default comes from)."""
    from zegkit.inference import PRECISIONS, InferenceConfig

    return [
        ("--precision", str, tuple(PRECISIONS), "compute precision; bf16 autocast pays off on GPUs "
         "and CPUs with native bf16 (AVX-512 BF16, AMX), not on AVX2-only CPUs", InferenceConfig),
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
        ("--logit-scale", float, None, "the method's softmax temperature over classes "
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
        "(default: none; required by the trained methods)",
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
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    add_model_arguments(parser)


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Expand files and folders into image paths, checking every one is readable first.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: a file is not a readable image, or two inputs share a file name (their outputs
            would overwrite each other).
    """
    from zegkit.io import list_images

    paths: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise FileNotFoundError(f"Input {str(item)!r} does not exist.")
        paths.extend(list_images(item) if item.is_dir() else [item])
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(
                f"{str(path)!r} is not a readable image ({error}); pass PNG, JPEG, BMP, TIFF or "
                "WebP files."
            ) from error
    stems = [path.stem for path in paths]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise ValueError(
            f"Several inputs are named {repeated}; their outputs would overwrite each other. "
            "Rename them or segment them in separate runs."
        )
    return paths


def run_segment(args: argparse.Namespace) -> None:
    from zegkit.text import parse_classes, read_class_file

    classes = (
        read_class_file(args.classes_file) if args.classes_file else parse_class_list(args.classes)
    )
    parse_classes(classes)  # validate before loading anything heavy
    images = collect_images(args.inputs)
    segmenter = build_segmenter(args)
    segmenter.set_vocabulary(classes)
    progress = tqdm(images, unit="image", disable=len(images) < 2)
    for path in progress:
        progress.set_postfix_str(path.name)
        written = segmenter.segment(path).save(args.out, path.stem, path)
        if len(images) < 2:
            print("\n".join(str(p) for p in written.values()))
    print(f"Segmented {len(images)} image(s) into {args.out}")


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
        help="named evaluation protocol (default: the dataset's; see zegkit.data.protocols)",
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
        type=int,
        default=50,
        help="images between progress-file updates (default: 50)",
    )
    parser.add_argument(
        "--num-workers", type=int, default=2, help="image-decoding worker processes (default: 2)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate only the first N images (default: all)"
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        help="resamples of the images for 95%% intervals of mIoU; with --method all the result "
        "keeps per-image counts for zegkit.evaluate.compare_results (default: 0, none)",
    )
    add_model_arguments(parser, allow_all=True)


def run_eval(args: argparse.Namespace) -> None:
    from zegkit.evaluate import (
        format_comparison,
        format_table,
        init_distributed,
        run_eval,
        run_eval_all,
    )

    context = init_distributed(args.device)
    output = args.output or Path("results") / f"{args.dataset}_{args.method}.json"
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
        num_workers=args.num_workers,
        limit=args.limit,
        bootstrap=args.bootstrap,
        progress=context.is_main,
        **user_settings(args),
    )
    if args.method == "all":
        results = run_eval_all(args.dataset, args.data_root, **common)
        report = format_comparison(results)
    else:
        report = format_table(run_eval(args.dataset, args.data_root, method=args.method, **common))
    if context.is_main:
        print(report)
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
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after N steps; the schedule stays the recipe's (default: all)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out exactly where its last checkpoint left it")
    parser.add_argument("--num-workers", type=int, default=2,
                        help="data-loading worker processes per process (default: 2)")
    parser.add_argument("--log-every", type=int, default=10,
                        help="steps between log lines (default: 10)")


def run_train(args: argparse.Namespace) -> None:
    from zegkit.train.loop import train
    from zegkit.train.recipes import get_recipe, with_overrides

    recipe = get_recipe(args.recipe)
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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zegkit", description="Zero-shot semantic segmentation with CLIP."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if add_arguments is not None:
            add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `zegkit` command; returns the exit status (2 for bad input, with a message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command][2](args)
    except USER_ERRORS as error:
        print(f"zegkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
