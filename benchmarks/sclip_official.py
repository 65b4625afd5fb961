"""zegkit's SCLIP against SCLIP's official code (wangf3014/SCLIP): same weights, same image, fp32.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/sclip_official.py \
        --sclip-root /path/to/SCLIP --sclip-commit d84d4ab4f8da69957c9838aa81240b0bd7287f1e \
        [--classes 10 150] [--repeats 5] [--threads 1] [--image photo.jpg] \
        [--json benchmarks/results/sclip_official.json]

`--sclip-root` is a checkout of the official code the user has (its `clip_segmentor.py`, `clip/`
with `bpe_simple_vocab_16e6.txt.gz`, `prompts/`, `pamr.py`); this script imports it from there and
runs its `CLIPForSegmentation` unchanged, as its `eval.py` does per image: the model's data
preprocessor, then `predict` (`forward_slide`: one crop at a time, each crop's logits upsampled to
the crop, padded to the image and summed; `postprocess_result`: x logit scale, softmax, argmax)
under `torch.no_grad()`, as mmengine's TestLoop runs it. The environment needs what that code
imports: torch, torchvision, mmengine, mmsegmentation, mmcv, ftfy, regex (pip install torch==<the
one zegkit uses> torchvision mmengine mmsegmentation "mmcv-lite<2.2" ftfy regex; zegkit importable
too). Two stand-ins are used only where the real import fails, and each run records which:

- mmcv-lite (the pure-Python mmcv wheel) has no compiled ops, and `import mmseg.models` imports
  some (deformable attention, point_sample, ...) at import time: `mmcv.ops` becomes a module whose
  every name raises if called. SCLIP's path calls none of them; mmseg's real `BaseSegmentor`,
  `SegDataPreProcessor`, `SegDataSample`, `MODELS` and mmengine's `PixelData` are used.
- A torchvision whose compiled ops do not load against this torch (PyPI's CUDA-linked wheel
  beside a CPU torch): torchvision is imported without its `__init__` (which loads them), so its
  pure-Python `transforms`, all SCLIP's `clip` package imports from it, are the real ones.

Weights: a ViT-B/16 CLIP with random (seeded) weights, built by the official `clip.model.CLIP`
and stored as OpenAI's checkpoints are (`convert_weights`: fp16 linear/conv/attention weights),
so `clip.load(path)` reads it and zegkit converts the same file (`zegkit.backbone.convert`).
zegkit's tokenizer is written from the official tokenizer's own vocabulary and merges, and the
prompt token ids are checked equal. Speed does not depend on the weights; labels still compare.

Classes: the first K ADE20K class names (one name each, no synonyms), in a class-name file for
the official code; CLIP's 80 ImageNet templates on both sides. Image: a 448 x 597 RGB image
(`--image` resized to short side 448, as the official COCO-Stuff config's
Resize(scale=(2048, 448)) does; by default zegkit's example scene), so both protocols cut the same
15 crops of 224 at stride 112; logit scale 40, no PAMR, no probability threshold.

Timing, in one process, after one warm-up of each: official, zegkit and the floor (`transformers`'
CLIPVisionTransformer over the same 15 crops, `zegkit.bench.plain_forward`) alternate N times;
seconds are medians, ratios are medians of the N paired ratios (robust to a busy neighbour).
The split of each side's time is measured in separate runs: the official's `net.encode_image`
calls (its ViT, one crop at a time) and zegkit's per-crop method forward (ViT with SCLIP's last
block, batched, dense logits included) are timed through wrappers set on the instances, never in
the timed runs; the rest of the official time is broken down by top-level torch op with
torch.profiler.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEFAULT_IMAGE = Path(__file__).resolve().parents[1] / "src/zegkit/assets/examples/scene.png"
SHORT_SIDE = 448  # SCLIP configs/cfg_coco_stuff164k.py: Resize(scale=(2048, 448), keep_ratio)
IMAGE_SIZE = (448, 597)  # (H, W): a 4:3 photo at short side 448, 3 x 5 crops
CROP, STRIDE = 224, 112  # SCLIP's CLIPForSegmentation defaults (slide_crop, slide_stride)
LOGIT_SCALE = 40  # SCLIP's default logit_scale (configs/base_config.py leaves it)
CLASS_COUNTS = (10, 150)
REPEATS = 5
SEED = 0
# ViT-B/16 CLIP as OpenAI's clip/model.py::CLIP takes it: embed_dim, image_resolution,
# vision_layers, vision_width, vision_patch_size, context_length, vocab_size, transformer_width,
# transformer_heads, transformer_layers.
VIT_B16 = (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)
# Vocabularies up to this size are embedded by the official code too (80 x K prompts).
OFFICIAL_TEXT_MAX = 10
PROFILE_TOP = 8  # ops listed in the official's "rest" breakdown


# --------------------------------------------------------------------------- importing the code


def _mmcv_ops_placeholder() -> types.ModuleType:
    """`mmcv.ops` for mmcv-lite: any name is a class that raises when built or called."""
    module = types.ModuleType("mmcv.ops")

    def missing(name: str) -> type:
        def fail(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"mmcv.ops.{name} needs mmcv built with its ops (not mmcv-lite).")

        return type(name, (), {"__init__": fail, "__call__": fail})

    def getattr_(name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return missing(name)

    module.__getattr__ = getattr_  # PEP 562: `from mmcv.ops import X` asks this
    return module


def _torchvision_imports() -> bool:
    """Whether `import torchvision` works here (checked in a child, so a failure leaves no
    half-registered ops in this process)."""
    return subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True,
                          check=False).returncode == 0


def _torchvision_without_ops() -> None:
    """Register the torchvision package without running its `__init__` (which loads the
    compiled ops), so its pure-Python submodules import as they are."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError("SCLIP's clip package imports torchvision: pip install it.")
    package = types.ModuleType("torchvision")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    sys.modules["torchvision"] = package


def import_official(root: Path) -> tuple[types.ModuleType, types.ModuleType, list[str]]:
    """(clip_segmentor, clip) modules of the official code at `root`, and the stand-ins used.

    Raises:
        FileNotFoundError: `root` does not hold clip_segmentor.py.
    """
    if not (root / "clip_segmentor.py").is_file():
        raise FileNotFoundError(
            f"{root} has no clip_segmentor.py: pass --sclip-root a checkout of "
            "https://github.com/wangf3014/SCLIP.")
    stand_ins = []
    if not _torchvision_imports():
        _torchvision_without_ops()
        stand_ins.append("torchvision imported without its compiled ops (they do not load here)")
    if importlib.util.find_spec("mmcv._ext") is None:
        sys.modules["mmcv.ops"] = _mmcv_ops_placeholder()
        stand_ins.append("mmcv.ops placeholder (mmcv-lite has no compiled ops; SCLIP uses none)")
    sys.path.insert(0, str(root))
    segmentor = importlib.import_module("clip_segmentor")
    return segmentor, importlib.import_module("clip"), stand_ins


# --------------------------------------------------------------------------- shared inputs


def write_weights(clip: types.ModuleType, path: Path) -> None:
    """A seeded random ViT-B/16 CLIP in OpenAI's checkpoint layout and dtypes."""
    torch.manual_seed(SEED)
    model = clip.model.CLIP(*VIT_B16)
    clip.model.convert_weights(model)  # fp16 weights, as OpenAI's files store them
    torch.save(model.state_dict(), path)


def write_tokenizer(clip: types.ModuleType, folder: Path) -> None:
    """A `transformers` CLIP tokenizer with the official tokenizer's vocabulary and merges."""
    from transformers import CLIPTokenizer

    official = clip.simple_tokenizer.SimpleTokenizer()
    merges = sorted(official.bpe_ranks, key=official.bpe_ranks.get)  # by rank
    tokenizer = CLIPTokenizer(vocab=dict(official.encoder), merges=merges,
                              model_max_length=VIT_B16[5])  # context length 77
    tokenizer.save_pretrained(folder)


def token_mismatches(clip: types.ModuleType, tokenizer: object, prompts: list[str]) -> int:
    """How many prompts zegkit's tokenizer encodes to other ids than `clip.tokenize`."""
    theirs = clip.tokenize(prompts)
    ours = tokenizer(prompts)["input_ids"]
    return sum(list(row[: len(ids)]) != ids for row, ids in zip(theirs.tolist(), ours,
                                                                 strict=True))


def class_names(count: int) -> list[str]:
    """The first `count` ADE20K class names, first synonym only."""
    from zegkit.bench import class_names as ade_names

    return [entry.split(";")[0].strip() for entry in ade_names(count)]


def load_image(path: Path) -> np.ndarray:
    """H x W x 3 uint8 RGB, resized (bilinear) to short side SHORT_SIDE."""
    image = Image.open(path).convert("RGB")
    if path == DEFAULT_IMAGE:  # the 448 x 448 example scene, stretched to a 4:3 photo
        return np.asarray(image.resize(IMAGE_SIZE[::-1], Image.BILINEAR))
    width, height = image.size
    scale = SHORT_SIDE / min(width, height)
    size = (round(width * scale), round(height * scale))
    return np.asarray(image.resize(size, Image.BILINEAR))


# --------------------------------------------------------------------------- the two sides


def official_model(segmentor: types.ModuleType, weights: Path, names: list[str],
                   folder: Path, text: torch.Tensor | None = None) -> torch.nn.Module:
    """SCLIP's CLIPForSegmentation on the CPU with its defaults, reading a class-name file.

    With `text` (K x D, one L2-normalised row per name), the model is built on the first name
    only and then given these class embeddings (`query_features`, one query per class), which
    spares its 80 templates x K prompts at 77 tokens each (minutes per class set on one CPU
    thread); its per-image code is the same either way.
    """
    name_file = folder / f"cls_{len(names)}.txt"
    name_file.write_text("\n".join(names if text is None else names[:1]) + "\n", encoding="utf-8")
    model = segmentor.CLIPForSegmentation(
        clip_path=str(weights), name_path=str(name_file), device=torch.device("cpu"),
        pamr_steps=0, prob_thd=0.0, logit_scale=LOGIT_SCALE, slide_stride=STRIDE,
        slide_crop=CROP, area_thd=None)
    if text is not None:
        model.query_features = text.clone()
        model.query_idx = torch.arange(len(names))
        model.num_queries = model.num_classes = len(names)
    return model.eval()


def official_runner(model: torch.nn.Module, rgb: np.ndarray) -> Callable[[], object]:
    """One image through the official model as mmseg's test loop does: data preprocessor
    (BGR -> RGB, normalise), then predict; the input is what LoadImageFromFile + PackSegInputs
    give, a BGR uint8 C x H x W tensor."""
    from mmseg.structures import SegDataSample

    bgr = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1].transpose(2, 0, 1)))
    shape = tuple(rgb.shape[:2])

    @torch.no_grad()
    def run() -> object:
        sample = SegDataSample(metainfo=dict(ori_shape=shape, img_shape=shape, pad_shape=shape))
        return model.test_step(dict(inputs=[bgr], data_samples=[sample]))[0]

    return run


def zegkit_segmenter(weights: Path, tokenizer: Path) -> object:
    """zegkit's SCLIP on the same file, SCLIP's protocol, fp32."""
    from zegkit import load_segmenter

    return load_segmenter("sclip", model=weights, tokenizer=str(tokenizer), precision="fp32",
                          short_side=SHORT_SIDE, crop=CROP, stride=STRIDE,
                          logit_scale=float(LOGIT_SCALE), templates="imagenet")


# --------------------------------------------------------------------------- measuring


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternating(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run over `repeats` rounds, the runs alternating, after one warm-up each."""
    for run in runs.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name].append(_seconds(run))
    return seconds


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


class Accumulator:
    """Wraps a callable, adding up the seconds spent in it."""

    def __init__(self, fn: Callable, label: str) -> None:
        self.fn, self.label, self.seconds = fn, label, 0.0

    def __call__(self, *args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        with torch.profiler.record_function(self.label):
            result = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return result


def split_seconds(run: Callable[[], object], owner: object, attribute: str, repeats: int
                  ) -> tuple[float, float]:
    """(median total seconds, median seconds inside `owner.attribute`) of `run`: the attribute
    is wrapped on the instance for these runs only, then put back."""
    original = getattr(owner, attribute)
    wrapper = Accumulator(original, attribute)
    setattr(owner, attribute, wrapper)
    try:
        totals, inside = [], []
        for _ in range(repeats):
            wrapper.seconds = 0.0
            totals.append(_seconds(run))
            inside.append(wrapper.seconds)
    finally:
        setattr(owner, attribute, original)
    return statistics.median(totals), statistics.median(inside)


def top_level_ops(run: Callable[[], object], owner: object, attribute: str
                  ) -> dict[str, float]:
    """Seconds per top-level torch op outside `owner.attribute` in one profiled run, largest
    first (`attribute`'s own total under its name)."""
    original = getattr(owner, attribute)
    setattr(owner, attribute, Accumulator(original, attribute))
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
    finally:
        setattr(owner, attribute, original)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.cpu_parent is None:
            totals[event.name] += event.cpu_time_total / 1e6
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


@dataclass
class Row:
    """One vocabulary size: seconds per image, ratios, agreement, where the time goes."""

    classes: int
    official_s: float
    zegkit_s: float
    floor_s: float
    official_x_floor: float
    zegkit_x_floor: float
    zegkit_x_official: float
    label_agreement: float
    max_prob_diff: float
    max_text_embedding_diff: float | None  # None: the official model got zegkit's embeddings
    token_mismatches: int
    official_vit_s: float
    official_rest_s: float
    zegkit_forward_s: float
    zegkit_rest_s: float
    official_rest_ops_s: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)


def measure(segmentor: types.ModuleType, clip: types.ModuleType, weights: Path,
            tokenizer: Path, rgb: np.ndarray, count: int, repeats: int, folder: Path,
            official_text_max: int) -> Row:
    """Build both sides for `count` classes, compare their outputs, time and split them.

    Up to `official_text_max` classes the official model embeds its own vocabulary and the
    two sides' class embeddings are compared; above it, it gets zegkit's (`official_model`).
    """
    from zegkit.bench import plain_forward
    from zegkit.text import TEMPLATES

    names = class_names(count)
    segmenter = zegkit_segmenter(weights, tokenizer)
    text = segmenter.set_vocabulary(names)
    prompts = [template.format(name) for name in names for template in TEMPLATES["imagenet"]]
    mismatches = token_mismatches(clip, segmenter.backbone.tokenizer, prompts)
    own_text = count <= official_text_max
    official = official_model(segmentor, weights, names, folder,
                              None if own_text else text.embeddings)
    text_diff = (official.query_features - text.embeddings).abs().max().item() if own_text else None

    image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]  # uint8
    run_official = official_runner(official, rgb)
    result = run_official()
    probabilities = segmenter.probabilities(image)[0]
    labels = segmenter.predict(image)[0]
    theirs = result.pred_sem_seg.data[0]
    agreement = (labels == theirs).double().mean().item()
    prob_diff = (probabilities - result.seg_logits.data).abs().max().item()

    floor, crops = plain_forward(segmenter.backbone, image.float() / 255, segmenter.config)
    if crops != 15:
        raise RuntimeError(f"expected 15 crops of {CROP} at stride {STRIDE}, got {crops}")
    seconds = alternating(
        {"official": run_official, "zegkit": lambda: segmenter.predict(image), "floor": floor},
        repeats)
    official_total, official_vit = split_seconds(run_official, official.net, "encode_image",
                                                 repeats)
    zegkit_total, zegkit_forward = split_seconds(lambda: segmenter.predict(image), segmenter,
                                                 "_forward", repeats)
    ops = top_level_ops(run_official, official.net, "encode_image")
    return Row(
        classes=count,
        official_s=statistics.median(seconds["official"]),
        zegkit_s=statistics.median(seconds["zegkit"]),
        floor_s=statistics.median(seconds["floor"]),
        official_x_floor=paired_ratio(seconds["official"], seconds["floor"]),
        zegkit_x_floor=paired_ratio(seconds["zegkit"], seconds["floor"]),
        zegkit_x_official=paired_ratio(seconds["zegkit"], seconds["official"]),
        label_agreement=agreement,
        max_prob_diff=prob_diff,
        max_text_embedding_diff=text_diff,
        token_mismatches=mismatches,
        official_vit_s=official_vit,
        official_rest_s=official_total - official_vit,
        zegkit_forward_s=zegkit_forward,
        zegkit_rest_s=zegkit_total - zegkit_forward,
        official_rest_ops_s={name: round(value, 4) for name, value in
                             list(ops.items())[:PROFILE_TOP]},
        seconds={name: [round(value, 4) for value in values] for name, values in seconds.items()},
    )


# --------------------------------------------------------------------------- reporting


HEADER = (f"{'K':>4}{'official s':>12}{'zegkit s':>10}{'floor s':>9}{'off/floor':>11}"
          f"{'zeg/floor':>11}{'zeg/off':>9}{'labels =':>10}{'max dP':>10}")


def format_row(row: Row) -> str:
    return (f"{row.classes:>4}{row.official_s:>12.3f}{row.zegkit_s:>10.3f}{row.floor_s:>9.3f}"
            f"{row.official_x_floor:>11.2f}{row.zegkit_x_floor:>11.2f}"
            f"{row.zegkit_x_official:>9.2f}{row.label_agreement:>10.6f}"
            f"{row.max_prob_diff:>10.1e}")


def format_split(row: Row) -> str:
    ops = ", ".join(f"{name} {value:.3f}" for name, value in row.official_rest_ops_s.items()
                    if name != "encode_image")
    return (f"K={row.classes}: official ViT (15 x encode_image) {row.official_vit_s:.3f} s + "
            f"rest {row.official_rest_s:.3f} s; zegkit method forward {row.zegkit_forward_s:.3f} "
            f"s + rest {row.zegkit_rest_s:.3f} s\n  official top-level ops: {ops}")


def zegkit_source() -> dict[str, object]:
    """The commit of the zegkit checkout this runs from, and whether its src/ had changes."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "src_changed": bool(git("status", "--porcelain", "src"))}


def machine(threads: int, note: str | None) -> dict[str, object]:
    from zegkit.hardware import cpu_bf16_flags, cpu_model, usable_cores

    return {"cpu": cpu_model(), "cpu_bf16_flags": cpu_bf16_flags(), "torch_threads": threads,
            "usable_cores": usable_cores(), "torch": torch.__version__, "note": note}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sclip-root", type=Path, required=True,
                        help="checkout of the official SCLIP code (required)")
    parser.add_argument("--sclip-commit", default=None,
                        help="commit of that checkout, for the record (default: none recorded)")
    parser.add_argument("--classes", type=int, nargs="+", default=list(CLASS_COUNTS),
                        help=f"vocabulary sizes (default: {' '.join(map(str, CLASS_COUNTS))})")
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help=f"timed rounds per vocabulary size (default: {REPEATS})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE,
                        help="image, resized to short side 448 (default: zegkit's example scene "
                             "stretched to 448 x 597)")
    parser.add_argument("--official-text-max", type=int, default=OFFICIAL_TEXT_MAX,
                        help="largest vocabulary the official model embeds itself; larger ones "
                             f"get zegkit's class embeddings (default: {OFFICIAL_TEXT_MAX})")
    parser.add_argument("--note", default=None,
                        help="what else the machine was doing, for the record (default: none)")
    parser.add_argument("--json", type=Path, default=None, help="write results here (default: no)")
    args = parser.parse_args(argv)
    if any(count < 1 for count in args.classes) or args.repeats < 1 or args.threads < 1:
        parser.error("--classes, --repeats and --threads must be positive.")

    torch.set_num_threads(args.threads)
    segmentor, clip, stand_ins = import_official(args.sclip_root.resolve())
    rgb = load_image(args.image)
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        weights, tokenizer = folder / "ViT-B-16-random.pt", folder / "tokenizer"
        write_weights(clip, weights)
        write_tokenizer(clip, tokenizer)
        print(HEADER)
        for count in args.classes:
            row = measure(segmentor, clip, weights, tokenizer, rgb, count, args.repeats, folder,
                          args.official_text_max)
            print(format_row(row), flush=True)
            rows.append(row)
    for row in rows:
        print(format_split(row))
    if args.json is not None:
        from zegkit.io import save_json_atomic

        save_json_atomic({
            "machine": machine(args.threads, args.note),
            "zegkit": zegkit_source(),
            "official": {"repository": "wangf3014/SCLIP", "commit": args.sclip_commit,
                         "stand_ins": stand_ins},
            "protocol": {"image_hw": list(rgb.shape[:2]), "crop": CROP, "stride": STRIDE,
                         "crops": 15, "logit_scale": LOGIT_SCALE, "precision": "fp32",
                         "templates": "CLIP's 80 ImageNet templates", "pamr": False,
                         "image": str(args.image.name), "repeats": args.repeats,
                         "official_text_max": args.official_text_max},
            "rows": [asdict(row) for row in rows],
        }, args.json)


if __name__ == "__main__":
    main()
