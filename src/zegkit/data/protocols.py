"""Evaluation protocols: the settings behind the field's published tables, by name.

A `Protocol` names a dataset and the inference settings a paper's table used (short side, crop,
stride, mode, background threshold), the seen/unseen classes of a zero-shot split, and the
per-method settings the papers' released configs use on that dataset (e.g. SCLIP's logit scale 65
on VOC21). Its inference fields have the names of `zegkit.inference.InferenceConfig`'s. A
protocol never sets one method's temperature for all of them: a method it has no values for runs
with its own defaults. Settings resolve as: the user's explicit setting > the protocol's value
for that method > the method's default (see `zegkit.segmenter.build_segmenter`). A result records
the protocol's name and the effective settings, so every number says what produced it.

Sources:

- ``sclip-*``: SCLIP (arXiv 2312.01597), wangf3014/SCLIP @ 57fa9aa ``configs/cfg_*.py`` and
  ``clip_segmentor.py``: ``Resize(scale=(2048, short_side), keep_ratio=True)``, sliding window
  224 / stride 112, ``prob_thd`` (our background_threshold) on the datasets with a background
  class, and SCLIP's ``logit_scale`` where a config sets one (40, SCLIP's default, otherwise).
  ClearCLIP and NACLIP evaluate with the same resize / window / threshold settings and their own
  logit scales (their method defaults). SCLIP's VOC21 config also sets ``area_thd=0.1`` (classes
  covering less than 10% of the predicted foreground are dropped); zegkit does not implement it, so
  sclip-voc21 numbers can differ slightly from SCLIP's table.
- ``zegclip-voc-15-5``, ``zegclip-coco-156-15``: ZegCLIP (arXiv 2212.03588),
  ZiqinZhou66/ZegCLIP ``configs/voc12/vpt_seg_zero_vit-b_512x512_20k_12_10.py`` and
  ``configs/coco/vpt_seg_zero_vit-b_512x512_80k_12_100_multi.py``: test short side 512
  (``img_scale=(2048, 512)``), slide 512 / stride 426; VOC evaluated without background (voc20),
  unseen = the last five VOC classes (``novel_class = [15..19]``); COCO-Stuff 171 with
  ``novel_class = [19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160]``, the
  ZS3Net split (Bucher et al., arXiv 1906.00817).
- ``zs3-context-49-10``: ZS3Net's Pascal Context split, valeoai/ZS3
  ``pascal_context_unseen_classes.txt`` (10 unseen: cow, motorbike, sofa, cat, boat, fence,
  bird, tvmonitor, keyboard, aeroplane), on Context 59 with the ZegCLIP-family test settings.
- ``cascadeclip-context-49-10``: HVision-NKU/Cascade-CLIP
  ``configs/context_59/vpt_seg_zero_vit-b_512x512_40k_12_10.py`` gives
  ``novel_class = [0, 2, 3, 7, 9, 13, 17, 19, 31, 37]`` as indices into MMSegmentation's
  alphabetical Context-59 order, which names aeroplane, bed, bedclothes, boat, bottle, car,
  cloth, cow, keyboard, plate -- not ZS3Net's ten. (Those indices, plus one, are ZS3Net's classes
  in ZS3Net's own VOC-first class order, so the list looks carried over without re-indexing.)
  Published Cascade-CLIP Context numbers were computed on this split; both are provided.
- ``cliper-*``: CLIPer (arXiv 2411.13836), linsun449/cliper.code @ 85fbe81
  ``scripts/config/vit-b-16/*.yaml`` (the ViT-B/16 configs): whole image at short side 336
  (Cityscapes 560), and CLIPer's own ``logit_scale``, ``attention_thr`` (which sets both its
  propagation and its diffusion threshold) and ``select_layer``; ``bkg_thre`` as the background
  threshold on the datasets with a background class. Not reproduced: the configs' 15 "car"
  templates, the background "stuff" words added as extra softmax rows, the per-class score
  rescaling and ``score_threshold`` of its decision rule (``util/miou.py::cam_to_label``), and
  the sliding-window mix of some configs; so numbers can differ from CLIPer's table.
- ``zegkit-synthetic``: zegkit's synthetic proving ground; seen/unseen come from the dataset's
  split.json.
- ``pascal-5i-fold{0..3}``, ``coco-20i-fold{0..3}`` (fold sets ``pascal-5i``, ``coco-20i``): the
  few-shot segmentation benchmarks ClsCLIP reports (shared/research/clsclip.md §5). PASCAL-5i
  (Shaban et al., arXiv 1709.03410): VOC 2012 + SBD, fold i = VOC classes 5i+1..5i+5 in VOC
  order; COCO-20i (Nguyen & Todorovic, arXiv 1909.02207) as PFENet / HSNet / BAM split it
  (``use_split_coco``): fold i = the COCO classes 4k+i+1, k = 0..19. A fold's classes are its
  unseen classes: training uses the other folds' classes with the fold's images removed
  (recipes' ``drop_unseen_images``), evaluation is `episodes` seeded 1-way episodes (1000 per
  fold, as (E)) over the val images showing a fold class with at least `episode_min_pixels`
  pixels (PFENet's ``2 * 32 * 32`` filter of ``util/dataset.py::make_dataset``). Test size: (E)
  evaluates at 480 x 480; here the short side is 480, one whole-image pass.
- ``synthetic-4x5-fold{0..3}`` (fold set ``synthetic-4x5``): the same fold protocol on the
  proving ground's 20 classes, fold i = classes i, i+4, ..., i+16 (interleaved, as COCO-20i, so
  that each fold holds stuff and things: 21-36% of the training scenes show no class of a fold,
  against 15% for the all-stuff contiguous fold 0), whole 224 scenes, no pixel filter (its small
  shapes are the zoom-in's test).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from zegkit.data.base import class_indices, display_name, shipped_class_names
from zegkit.data.synthetic import CLASSES as SYNTHETIC_CLASSES

# Settings shared by the training-free protocol (SCLIP clip_segmentor.py defaults).
SCLIP_CROP = 224
SCLIP_STRIDE = 112
SCLIP_PROB_THRESHOLD = 0.1
# ZegCLIP / Cascade-CLIP test settings (test_cfg slide crop 512, stride 426; img_scale 2048x512).
ZEGCLIP_SHORT_SIDE = 512
ZEGCLIP_CROP = 512
ZEGCLIP_STRIDE = 426

INFERENCE_FIELDS = ("short_side", "crop", "stride", "mode", "background_threshold")


@dataclass(frozen=True)
class Protocol:
    """One benchmark's evaluation settings.

    Attributes:
        name: the protocol's id, recorded with every result (e.g. "sclip-voc21").
        dataset: the `zegkit.data.load_dataset` name it evaluates.
        short_side: images are resized so the short side has this many pixels (None: as stored).
        crop: sliding-window size in pixels.
        stride: sliding-window step in pixels.
        mode: "slide" or "whole" (InferenceConfig.mode).
        background_threshold: pixels whose best class probability is below it become class 0,
            the background; None for datasets without a background class.
        seen: display names of the seen classes of a zero-shot split (None: no split, or the
            dataset's own split).
        unseen: display names of the unseen classes.
        method_settings: method name -> settings of that method's config its released config
            uses here (e.g. {"sclip": {"logit_scale": 65.0}}); other methods keep their defaults.
        source: the paper / repository file the numbers come from.
        episodes: evaluate as this many seeded 1-way episodes over the `unseen` classes
            (`zegkit.evaluate.episodes`) instead of dense multi-class mIoU; None: dense.
        episode_seed: seeds the episodes.
        episode_min_pixels: an (image, class) pair is an episode candidate only when the class
            covers at least this many pixels of the image.
    """

    name: str
    dataset: str
    short_side: int | None
    crop: int
    stride: int
    mode: str = "slide"
    background_threshold: float | None = None
    seen: tuple[str, ...] | None = None
    unseen: tuple[str, ...] | None = None
    method_settings: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    source: str = ""
    episodes: int | None = None
    episode_seed: int = 0
    episode_min_pixels: int = 0

    def inference_overrides(self) -> dict[str, object]:
        """The InferenceConfig fields this protocol sets, None included: short_side None keeps
        the input size, background_threshold None is off."""
        return {name: getattr(self, name) for name in INFERENCE_FIELDS}

    def settings_for(self, method: str) -> dict[str, object]:
        """The settings this protocol gives `method` (empty: the method's defaults)."""
        return dict(self.method_settings.get(method, {}))

    def split_indices(
        self, class_names: Sequence[str]
    ) -> tuple[list[int] | None, list[int] | None]:
        """(seen, unseen) class indices in a vocabulary; seen defaults to all but the unseen.

        Raises:
            ValueError: a protocol class name is not (exactly once) in `class_names`.
        """
        if self.unseen is None:
            return None, None
        unseen = class_indices(self.unseen, class_names)
        if self.seen is None:
            seen = [i for i in range(len(class_names)) if i not in unseen]
        else:
            seen = class_indices(self.seen, class_names)
        return seen, unseen

    def to_dict(self) -> dict[str, object]:
        """The protocol as a JSON-ready dict (recorded next to results)."""
        record = asdict(self)
        record["method_settings"] = {k: dict(v) for k, v in self.method_settings.items()}
        for key in ("seen", "unseen"):
            if record[key] is not None:
                record[key] = list(record[key])
        return record


def _sclip(dataset: str, short_side: int, logit_scale: float | None = None,
           background_threshold: float | None = None, config: str = "") -> Protocol:
    """A protocol of SCLIP's configs; `logit_scale` is SCLIP's own where its config sets one."""
    return Protocol(
        name=f"sclip-{dataset}",
        dataset=dataset,
        short_side=short_side,
        crop=SCLIP_CROP,
        stride=SCLIP_STRIDE,
        background_threshold=background_threshold,
        method_settings={} if logit_scale is None else {"sclip": {"logit_scale": logit_scale}},
        source=f"SCLIP arXiv 2312.01597, wangf3014/SCLIP configs/{config}",
    )


CLIPER_SHORT_SIDE = 336  # `size` of the ViT-B/16 configs (Cityscapes: 560)


def _cliper(dataset: str, logit_scale: float, threshold: float,
            background_threshold: float | None = None, short_side: int = CLIPER_SHORT_SIDE,
            config: str = "") -> Protocol:
    """A protocol of CLIPer's ViT-B/16 configs (whole image; its own method settings)."""
    settings = {
        "logit_scale": logit_scale,
        "propagate_threshold": threshold,
        "diffusion_threshold": threshold,
        "propagate_layer": -1,  # select_layer of every ViT-B/16 config
    }
    return Protocol(
        name=f"cliper-{dataset}",
        dataset=dataset,
        short_side=short_side,
        crop=SCLIP_CROP,
        stride=SCLIP_STRIDE,
        mode="whole",
        background_threshold=background_threshold,
        method_settings={"cliper": settings},
        source=f"CLIPer arXiv 2411.13836, linsun449/cliper.code scripts/config/vit-b-16/{config}",
    )


def _zero_shot(name: str, dataset: str, unseen: Sequence[str], source: str) -> Protocol:
    return Protocol(
        name=name,
        dataset=dataset,
        short_side=ZEGCLIP_SHORT_SIDE,
        crop=ZEGCLIP_CROP,
        stride=ZEGCLIP_STRIDE,
        unseen=tuple(unseen),
        source=source,
    )


VOC_UNSEEN_5 = ("pottedplant", "sheep", "sofa", "train", "tvmonitor")
COCO_STUFF_UNSEEN_15 = (
    "cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "cardboard",
    "clouds", "grass", "playingfield", "river", "road", "tree", "wall-concrete",
)
ZS3_CONTEXT_UNSEEN_10 = (
    "cow", "motorbike", "sofa", "cat", "boat", "fence", "bird", "tvmonitor", "keyboard",
    "aeroplane",
)
CASCADECLIP_CONTEXT_UNSEEN_10 = (
    "aeroplane", "bed", "bedclothes", "boat", "bottle", "car", "cloth", "cow", "keyboard", "plate",
)

# The fold sets' classes in label order, without background (read from the shipped lists).
PASCAL_CLASSES = tuple(display_name(name) for name in shipped_class_names("voc21")[1:])
COCO_THINGS = tuple(display_name(name) for name in shipped_class_names("coco_object")[1:])
NUM_FOLDS = 4
EPISODES_PER_FOLD = 1000  # (E) test.py, as the few-shot segmentation literature
FSS_MIN_PIXELS = 2 * 32 * 32  # PFENet util/dataset.py make_dataset
FSS_SHORT_SIDE = 480  # (E)'s test size
# fold set -> (dataset, classes, folds as class positions, short side, min pixels, source)
FOLD_SETS = {
    "pascal-5i": ("voc21", PASCAL_CLASSES, [range(5 * i, 5 * i + 5) for i in range(NUM_FOLDS)],
                  FSS_SHORT_SIDE, FSS_MIN_PIXELS,
                  "PASCAL-5i (arXiv 1709.03410): fold i = VOC classes 5i+1..5i+5"),
    "coco-20i": ("coco20i", COCO_THINGS, [range(i, 80, NUM_FOLDS) for i in range(NUM_FOLDS)],
                 FSS_SHORT_SIDE, FSS_MIN_PIXELS,
                 "COCO-20i (arXiv 1909.02207), PFENet/HSNet/BAM split: fold i = classes 4k+i+1"),
    "synthetic-4x5": ("synthetic", SYNTHETIC_CLASSES,
                      [range(i, 20, NUM_FOLDS) for i in range(NUM_FOLDS)], None, 0,
                      "zegkit proving ground: fold i = classes i, i+4, ..., i+16"),
}


def _fold(fold_set: str, fold: int) -> Protocol:
    """Fold `fold` of a fold set: its classes unseen, 1-way episodes, one whole-image pass."""
    dataset, classes, folds, short_side, min_pixels, source = FOLD_SETS[fold_set]
    return Protocol(
        name=f"{fold_set}-fold{fold}",
        dataset=dataset,
        short_side=short_side,
        crop=SCLIP_CROP,
        stride=SCLIP_STRIDE,
        mode="whole",
        unseen=tuple(classes[i] for i in folds[fold]),
        source=source,
        episodes=EPISODES_PER_FOLD,
        episode_min_pixels=min_pixels,
    )


def fold_protocols(name: str) -> list[Protocol] | None:
    """The fold protocols a name stands for: a fold set's four, a single fold protocol, or
    None when `name` is not an episode protocol."""
    if name in FOLD_SETS:
        return [PROTOCOLS[f"{name}-fold{fold}"] for fold in range(NUM_FOLDS)]
    protocol = PROTOCOLS.get(name)
    return [protocol] if protocol is not None and protocol.episodes else None


_PROTOCOL_LIST = (
    _sclip("voc21", 336, 65.0, SCLIP_PROB_THRESHOLD, "cfg_voc21.py"),
    _sclip("voc20", 336, config="cfg_voc20.py"),
    _sclip("context60", 336, 50.0, SCLIP_PROB_THRESHOLD, "cfg_context60.py"),
    _sclip("context59", 336, config="cfg_context59.py"),
    _sclip("coco_object", 336, 50.0, SCLIP_PROB_THRESHOLD, "cfg_coco_object.py"),
    _sclip("coco_stuff171", 448, config="cfg_coco_stuff164k.py"),
    _sclip("cityscapes19", 560, config="cfg_city_scapes.py"),
    _sclip("ade150", 336, config="cfg_ade20k.py"),
    _zero_shot(
        "zegclip-voc-15-5", "voc20", VOC_UNSEEN_5,
        "ZegCLIP arXiv 2212.03588, configs/voc12/vpt_seg_zero_vit-b_512x512_20k_12_10.py",
    ),
    _zero_shot(
        "zegclip-coco-156-15", "coco_stuff171", COCO_STUFF_UNSEEN_15,
        "ZegCLIP arXiv 2212.03588, configs/coco/vpt_seg_zero_vit-b_512x512_80k_12_100_multi.py",
    ),
    _zero_shot(
        "zs3-context-49-10", "context59", ZS3_CONTEXT_UNSEEN_10,
        "ZS3Net arXiv 1906.00817, valeoai/ZS3 pascal_context_unseen_classes.txt",
    ),
    _zero_shot(
        "cascadeclip-context-49-10", "context59", CASCADECLIP_CONTEXT_UNSEEN_10,
        "Cascade-CLIP arXiv 2406.00670, configs/context_59/vpt_seg_zero_vit-b_512x512_40k_12_10.py",
    ),
    _cliper("voc21", 100.0, 0.1, 0.6, config="voc21"),
    _cliper("voc20", 100.0, 0.1, config="voc20"),
    _cliper("context60", 100.0, 0.2, 0.45, config="context"),
    _cliper("context59", 100.0, 0.2, config="context59"),
    _cliper("coco_object", 50.0, 0.2, 0.3, config="object"),
    _cliper("coco_stuff171", 50.0, 0.2, config="stuff164"),
    _cliper("ade150", 100.0, 0.2, config="ade150"),
    _cliper("cityscapes19", 100.0, 0.35, short_side=560, config="city"),
    Protocol(
        name="zegkit-synthetic",
        dataset="synthetic",
        short_side=None,
        crop=SCLIP_CROP,
        stride=SCLIP_STRIDE,
        source="zegkit synthetic proving ground (seen/unseen from the dataset's split.json)",
    ),
    *(_fold(fold_set, fold) for fold_set in FOLD_SETS for fold in range(NUM_FOLDS)),
)
PROTOCOLS: dict[str, Protocol] = {protocol.name: protocol for protocol in _PROTOCOL_LIST}
# The protocol `zegkit eval --dataset X` uses when none is named.
DEFAULT_PROTOCOLS: dict[str, str] = {
    "voc21": "sclip-voc21",
    "voc20": "sclip-voc20",
    "context60": "sclip-context60",
    "context59": "sclip-context59",
    "coco_object": "sclip-coco_object",
    "coco_stuff171": "sclip-coco_stuff171",
    "cityscapes19": "sclip-cityscapes19",
    "ade150": "sclip-ade150",
    "synthetic": "zegkit-synthetic",
}


def list_protocols() -> dict[str, str]:
    """{protocol name: "dataset -- source"} for every named protocol and fold set."""
    folds = {name: f"{spec[0]} -- all {NUM_FOLDS} folds of {spec[-1]}"
             for name, spec in FOLD_SETS.items()}
    return {**{name: f"{p.dataset} -- {p.source}" for name, p in PROTOCOLS.items()}, **folds}


def get_protocol(name: str) -> Protocol:
    """A protocol by name.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    if name not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {name!r}. Known protocols: {sorted(PROTOCOLS)}.")
    return PROTOCOLS[name]


def default_protocol(dataset: str) -> Protocol | None:
    """The protocol used for `dataset` when none is named (None for e.g. "folder")."""
    name = DEFAULT_PROTOCOLS.get(dataset)
    return None if name is None else PROTOCOLS[name]

