"""Vocabulary -> text embeddings: class names with synonyms, prompt templates, ensembling, caching.

A vocabulary is a list of classes; each class is one or more synonyms written in one string and
separated by ";" (``"person; people; man"``). The first synonym is the display name. Each synonym is
embedded as CLIP does for zero-shot classification (arXiv 2103.00020, notebook
``Prompt_Engineering_for_ImageNet``): fill every template with the synonym, embed each prompt,
L2-normalise each, average over templates, L2-normalise again.

Synonyms are reduced in one of two ways (``synonym_reduce``):

- ``"max"`` (default): the protocol of the training-free field (SCLIP ``clip_segmentor.py::
  postprocess_result``, followed by ClearCLIP and NACLIP). Every synonym is its own classifier row;
  a pixel is scored against all synonym rows, and a class takes the **maximum** over its synonyms.
  SCLIP takes that maximum over probabilities, after a softmax (with the logit scale) over all
  synonym rows jointly; taking it over logits gives the same argmax.
  ``TextEmbeddings.classifier`` holds the synonym rows, ``reduce_synonym_logits`` maps scores over
  synonym rows back to scores over classes.
- ``"mean"``: one row per class, the normalised mean of its synonyms' embeddings.

Either way ``TextEmbeddings.embeddings`` is one L2-normalised row per class (the synonym mean),
for methods that need exactly one text vector per class.

Class files (``read_class_file``) hold one class per line with synonyms separated by ";" or, as in
the field's name files (SCLIP ``configs/cls_voc21.txt``), by ",".

Embeddings are cached on disk per vocabulary as safetensors, keyed by the sha256 of the model
identity, the templates and the synonyms, under ``$ZEGKIT_CACHE/text`` or ``~/.cache/zegkit/text``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from zegkit.io import atomic_write

# The 80 prompt templates CLIP uses for ImageNet zero-shot classification (CLIP repository,
# notebooks/Prompt_Engineering_for_ImageNet.ipynb), in CLIP's order. SCLIP, ClearCLIP and NACLIP
# use exactly these (prompts/imagenet_template.py::openai_imagenet_template).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 7 templates CLIP's ImageNet prompt-engineering notebook selected from the 80 (by sequential
# forward selection on ImageNet); nearly the accuracy of all 80 at 1/11 of the text-encoder cost.
# (ClearCLIP's `sub_imagenet_template` is this set with "a bad photo of a {}." in second place.)
SHORT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# The 5 scene templates MaskCLIP adds to the 80 (MaskCLIP tools/maskclip_utils/
# prompt_engineering.py::prompt_templates).
SCENE_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

# ZegCLIP's text embeddings (ZiqinZhou66/ZegCLIP configs/_base_/datasets/text_embedding/
# get_embedding.ipynb): VOC's one template has no full stop; COCO averages these 15.
ZEGCLIP_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "a {} in the scene.",
    "a photo of a {} in the scene.",
    "There is a {} in the scene.",
    "There is the {} in the scene.",
    "This is a {} in the scene.",
    "This is the {} in the scene.",
    "This is one {} in the scene.",
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "imagenet": IMAGENET_TEMPLATES,
    "short": SHORT_TEMPLATES,
    "single": ("a photo of a {}.",),
    "maskclip": IMAGENET_TEMPLATES + SCENE_TEMPLATES,
    "zegclip-single": ("a photo of a {}",),
    "zegclip-multi": ZEGCLIP_TEMPLATES,
}

SYNONYM_REDUCTIONS = ("max", "mean")
SYNONYM_SEPARATOR = ";"
FILE_SEPARATORS = (";", ",")  # a class-file line uses ";" if it has one, else "," (SCLIP files)
DEFAULT_BATCH_SIZE = 256  # prompts per text-encoder call
CACHE_ENV = "ZEGKIT_CACHE"
CACHE_FORMAT = 1  # bump when the cached content or its meaning changes
_PLACEHOLDER = "{}"
_WHITESPACE = re.compile(r"\s+")


class TextEncoder(Protocol):
    """What `encode_vocabulary` needs from a backbone (zegkit.backbone.ClipBackbone has it)."""

    name: str

    def encode_text(self, texts: list[str]) -> Tensor: ...


@dataclass(frozen=True, eq=False)
class TextEmbeddings:
    """Text embeddings of one vocabulary.

    Attributes:
        embeddings: K x D, one L2-normalised row per class (the normalised mean of its synonyms).
        class_names: K display names (the first synonym of each class unless overridden).
        synonyms: K lists of synonyms, in input order.
        synonym_embeddings: S x D, one L2-normalised row per synonym, class-major order
            (class 0's synonyms first).
        class_index: S, long, the class of each synonym row.
        synonym_reduce: "max" (score every synonym, a class takes the max over its synonyms)
            or "mean" (score the class rows `embeddings`).
        templates: the prompt templates used.
        model_name: identifier of the backbone that produced the embeddings.
        eot: optional K x D per-class text EOT embeddings, for methods that want them; not filled
            by `encode_vocabulary`.
    """

    embeddings: Tensor
    class_names: list[str]
    synonyms: list[list[str]]
    synonym_embeddings: Tensor
    class_index: Tensor
    synonym_reduce: str = "max"
    templates: tuple[str, ...] = ()
    model_name: str = ""
    eot: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def classifier(self) -> Tensor:
        """Rows to score features against: synonym rows for "max", class rows for "mean".

        Score as ``features @ text.classifier.T`` (cosine similarity for normalised features), then
        map the scores back to classes with `reduce_synonym_logits`.
        """
        if self.synonym_reduce == "max":
            return self.synonym_embeddings
        return self.embeddings

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> TextEmbeddings:
        """A copy with the embedding tensors moved/cast (class_index only moves)."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(
            self,
            embeddings=move(self.embeddings),
            synonym_embeddings=move(self.synonym_embeddings),
            class_index=self.class_index.to(device=device),
            eot=move(self.eot),
        )


# ---- parsing ----------------------------------------------------------------------------------
def _clean(name: str) -> str:
    return _WHITESPACE.sub(" ", name).strip()


def _split_entry(entry: str | Sequence[str], position: int) -> list[str]:
    if isinstance(entry, str):
        parts = entry.split(SYNONYM_SEPARATOR)
    elif isinstance(entry, Sequence) and all(isinstance(part, str) for part in entry):
        parts = list(entry)
    else:
        raise ValueError(
            f"Class {position} is {entry!r}; each class must be a string such as "
            f"'person; people; man' (synonyms separated by ';') or a list of strings."
        )
    names = [_clean(part) for part in parts]
    if not names or any(not name for name in names):
        raise ValueError(
            f"Class {position} ({entry!r}) has an empty name. Give every class at least one "
            f"non-blank name and no empty synonym (remove doubled or trailing ';')."
        )
    return names


def parse_classes(classes: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Split class entries into synonym lists and check them.

    Args:
        classes: one entry per class. An entry is a string with synonyms separated by ";"
            (``"person; people; man"``) or an already split list of synonyms. Commas are part of a
            name here; only class files (`read_class_file`) also split on ",". Whitespace is
            collapsed. Names compare case-insensitively (CLIP's tokenizer lower-cases).

    Returns:
        One list of synonyms per class, the display name first.

    Raises:
        ValueError: the list is empty or a bare string, an entry is blank or has an empty synonym,
            or a name appears twice (in one class or in two), which would make classes ambiguous.
    """
    if isinstance(classes, str):
        raise ValueError(
            f"classes must be a list of class names, got the single string {classes!r}. "
            f"Write [{classes!r}] for one class, or split it into a list of classes."
        )
    if not isinstance(classes, Sequence) or len(classes) == 0:
        raise ValueError(
            "The vocabulary is empty: give at least one class name, e.g. ['person', 'dog', 'sky']."
        )
    parsed = [_split_entry(entry, position) for position, entry in enumerate(classes)]
    owner: dict[str, int] = {}
    for position, names in enumerate(parsed):
        for name in names:
            key = name.casefold()
            if key not in owner:
                owner[key] = position
                continue
            first = owner[key]
            if first == position:
                raise ValueError(
                    f"Class {position} ({'; '.join(names)!r}) lists {name!r} twice; "
                    f"keep one of them."
                )
            raise ValueError(
                f"{name!r} appears in class {first} ({'; '.join(parsed[first])!r}) and in class "
                f"{position} ({'; '.join(names)!r}); a name may belong to one class only. Merge "
                f"the two classes or remove the name from one of them."
            )
    return parsed


def read_class_file(path: str | os.PathLike) -> list[str]:
    """Read a class-name file: one class per line, synonyms separated by ";" or ",".

    A line with a ";" is split on ";" only (so names may contain commas); otherwise it is split on
    "," as in the field's name files (SCLIP/NACLIP ``configs/cls_*.txt``). Lines starting with "#"
    are comments. Blank lines are allowed only at the end, because line order gives label ids.

    Args:
        path: the text file (UTF-8).

    Returns:
        One entry per class with synonyms joined by "; ", ready for `encode_vocabulary`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a folder, a file that is not UTF-8 text, a blank line between classes, an
            empty synonym, a duplicate name, or no class; each message names the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"Class file {str(path)!r} is a folder; give a text file with one class per line "
            f"(synonyms separated by ';' or ',')."
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"Class file {str(path)!r} does not exist. Give a text file with one class per line "
            f"(synonyms separated by ';' or ',')."
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"Class file {str(path)!r} is not UTF-8 text (byte {error.start}: {error.reason}); "
            "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None
    while lines and not lines[-1].strip():
        lines.pop()
    entries: list[str] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if text.startswith("#"):
            continue
        if not text:
            raise ValueError(
                f"{path}:{number} is blank. Class files hold one class per line and line order "
                f"gives the label ids; remove the blank line or put a class on it."
            )
        separator = ";" if ";" in text else ","
        entries.append("; ".join(part.strip() for part in text.split(separator)))
    if not entries:
        raise ValueError(f"{path} holds no class names; write one class per line.")
    try:
        parse_classes(entries)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return entries


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """Turn a template-set name or a list of templates into a checked tuple of templates.

    Raises:
        ValueError: unknown set name, an empty list, or a template without exactly one "{}".
    """
    if isinstance(templates, str):
        if templates not in TEMPLATES:
            raise ValueError(
                f"Unknown template set {templates!r}. Use one of {sorted(TEMPLATES)} or pass a "
                f"list of templates, each with one '{{}}' where the class name goes."
            )
        return TEMPLATES[templates]
    resolved = tuple(templates)
    if not resolved:
        raise ValueError(
            "The template list is empty; pass at least one, e.g. ['a photo of a {}.']."
        )
    for template in resolved:
        if not isinstance(template, str) or template.count(_PLACEHOLDER) != 1:
            raise ValueError(
                f"Template {template!r} must be a string with exactly one '{{}}' where the class "
                f"name goes, e.g. 'a photo of a {{}}.'."
            )
    return resolved


# ---- encoding ---------------------------------------------------------------------------------
def _normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def ensemble_templates(encode: Callable[[list[str]], Tensor], phrases: Sequence[str],
                       templates: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
                       name: str = "the text encoder") -> Tensor:
    """CLIP's prompt ensembling with any text encoder: each phrase in every template, the
    L2-normalised prompt embeddings averaged per phrase and normalised again.

    Args:
        encode: list of N prompts -> (N, D) embeddings (not necessarily normalised), e.g. a
            backbone's ``encode_text``; called without gradients, `batch_size` prompts at a time.
        phrases: S phrases (class names or synonyms).
        templates: T templates, each with one "{}".
        batch_size: prompts per `encode` call.
        name: what `encode` is, for error messages.

    Returns:
        S x D float32 CPU tensor, rows L2-normalised.

    Raises:
        RuntimeError: `encode` returned a wrong shape or non-finite values.
    """
    prompts = [template.format(phrase) for phrase in phrases for template in templates]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        with torch.no_grad():
            out = encode(batch)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != len(batch):
            raise RuntimeError(
                f"{name} returned {getattr(out, 'shape', type(out))} for {len(batch)} prompts; "
                f"it must return a tensor of shape (N, D)."
            )
        chunks.append(out.detach().float().cpu())
    per_prompt = torch.cat(chunks).view(len(phrases), len(templates), -1)  # (S, T, D)
    ensembled = _normalize(_normalize(per_prompt).mean(dim=1))  # (S, D)
    if not torch.isfinite(ensembled).all():
        bad = [phrases[i] for i in torch.nonzero(~torch.isfinite(ensembled).all(dim=1)).flatten()]
        raise RuntimeError(
            f"{name} gave non-finite embeddings for {bad}; check the weights and the precision "
            f"(run the text encoder in fp32)."
        )
    return ensembled


def _encode_synonyms(backbone: TextEncoder, phrases: list[str], templates: tuple[str, ...],
                     batch_size: int) -> Tensor:
    """S x D template-ensembled, L2-normalised embeddings of `phrases` (float32, CPU)."""
    return ensemble_templates(backbone.encode_text, phrases, templates, batch_size,
                              name=f"The text encoder of {backbone.name!r} "
                                   f"({type(backbone).__name__}.encode_text)")


def _class_means(synonym_embeddings: Tensor, class_index: Tensor, num_classes: int) -> Tensor:
    sums = torch.zeros(num_classes, synonym_embeddings.shape[1], dtype=synonym_embeddings.dtype)
    sums.index_add_(0, class_index, synonym_embeddings)
    return _normalize(sums)


# ---- cache ------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$ZEGKIT_CACHE/text`` if ZEGKIT_CACHE is set, else ``~/.cache/zegkit/text``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "zegkit"
    return base / "text"


def _weights_fingerprint(backbone: TextEncoder) -> str:
    """The backbone's weight fingerprint (`ClipBackbone.fingerprint`), so two models saved under
    one name get different cache entries; "" for encoders that have none."""
    return getattr(backbone, "fingerprint", "")


def _cache_key(identity: dict) -> str:
    blob = json.dumps(identity, sort_keys=True, ensure_ascii=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _load_cached(path: Path, identity: dict) -> Tensor | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            # Re-check the identity stored with the tensor (hash collisions, hand-edited files).
            stored = json.loads((handle.metadata() or {}).get("identity", "null"))
            tensor = handle.get_tensor("synonym_embeddings")
    except (OSError, SafetensorError, KeyError, ValueError) as error:
        warnings.warn(f"Ignoring unreadable text-embedding cache {path} ({error}); recomputing.",
                      stacklevel=3)
        return None
    if stored != identity or tensor.shape[0] != len(identity["phrases"]):
        warnings.warn(f"Text-embedding cache {path} does not match this vocabulary; recomputing.",
                      stacklevel=3)
        return None
    return tensor


def _store_cached(path: Path, identity: dict, tensor: Tensor) -> None:
    """Write atomically (`zegkit.io.atomic_write`); a failure only warns."""
    blob = save({"synonym_embeddings": tensor.contiguous()},
                metadata={"identity": json.dumps(identity, sort_keys=True)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as handle:
            handle.write(blob)
    except OSError as error:
        warnings.warn(f"Could not write the text-embedding cache {path} ({error}); continuing "
                      f"without it. Set {CACHE_ENV} or cache_dir to a writable folder.",
                      stacklevel=3)


# ---- public entry points ----------------------------------------------------------------------
def encode_vocabulary(
    backbone: TextEncoder,
    classes: Sequence[str | Sequence[str]],
    templates: str | Sequence[str] = "imagenet",
    synonym_reduce: str = "max",
    *,
    class_names: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> TextEmbeddings:
    """Embed a vocabulary with the backbone's text encoder (template-ensembled, cached).

    Args:
        backbone: has ``.encode_text(list[str]) -> Tensor (N, D)`` (projected EOT embeddings, not
            normalised) and ``.name``; e.g. `zegkit.backbone.ClipBackbone`.
        classes: one entry per class, synonyms separated by ";" (see `parse_classes`).
        templates: a set name from `TEMPLATES` ("imagenet" = CLIP's 80, "short" = CLIP's 7,
            "single", "maskclip" = 80 + 5 scene templates) or a list of templates with one "{}".
        synonym_reduce: "max" (the field's protocol: score each synonym, max over a class's
            synonyms) or "mean" (one row per class, the mean of its synonym embeddings).
        class_names: display names overriding the first synonyms (e.g. "background" for a class
            described only by stuff words, as SCLIP's VOC21 file does).
        batch_size: prompts per text-encoder call.
        cache_dir: folder of the disk cache; None means `default_cache_dir()`.
        use_cache: read and write the disk cache.

    Returns:
        TextEmbeddings on the backbone's device, float32.

    Raises:
        ValueError: bad classes, templates, synonym_reduce, class_names or batch_size.
        TypeError: `backbone` has no ``encode_text``/``name``.
        RuntimeError: the encoder returned a wrong shape or non-finite values.
    """
    if synonym_reduce not in SYNONYM_REDUCTIONS:
        raise ValueError(
            f"Unknown synonym_reduce {synonym_reduce!r}; use one of {list(SYNONYM_REDUCTIONS)}."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not callable(getattr(backbone, "encode_text", None)) or not hasattr(backbone, "name"):
        raise TypeError(
            f"{type(backbone).__name__} cannot embed text: it needs .encode_text(list[str]) and "
            f".name. Pass a backbone from zegkit.backbone.load_clip(...)."
        )
    synonyms = parse_classes(classes)
    names = [group[0] for group in synonyms]
    if class_names is not None:
        names = [_clean(str(name)) for name in class_names]
        if len(names) != len(synonyms) or not all(names):
            raise ValueError(
                f"class_names must give one non-blank name per class: got {len(names)} names for "
                f"{len(synonyms)} classes."
            )
    template_set = resolve_templates(templates)
    phrases = [name for group in synonyms for name in group]
    class_index = torch.tensor(
        [position for position, group in enumerate(synonyms) for _ in group], dtype=torch.long
    )

    identity = {
        "format": CACHE_FORMAT,
        "model": str(backbone.name),
        "weights": _weights_fingerprint(backbone),
        "templates": list(template_set),
        "phrases": phrases,
    }
    path = Path(cache_dir or default_cache_dir()) / f"{_cache_key(identity)}.safetensors"
    synonym_embeddings = _load_cached(path, identity) if use_cache else None
    if synonym_embeddings is None:
        synonym_embeddings = _encode_synonyms(backbone, phrases, template_set, batch_size)
        if use_cache:
            _store_cached(path, identity, synonym_embeddings)

    embeddings = _class_means(synonym_embeddings, class_index, len(synonyms))
    device = getattr(backbone, "device", None)
    result = TextEmbeddings(
        embeddings=embeddings,
        class_names=names,
        synonyms=synonyms,
        synonym_embeddings=synonym_embeddings,
        class_index=class_index,
        synonym_reduce=synonym_reduce,
        templates=template_set,
        model_name=str(backbone.name),
    )
    return result.to(device) if isinstance(device, (torch.device, str)) else result


def reduce_synonym_logits(scores: Tensor, text: TextEmbeddings) -> Tensor:
    """Map scores over ``text.classifier`` rows (dim 1) to scores over classes.

    For ``synonym_reduce="max"`` each class takes the maximum over its synonyms' scores; for
    "mean" the scores are already per class and are returned unchanged. Works on logits or on
    probabilities: SCLIP's protocol is ``reduce(softmax(logit_scale * scores, dim=1))`` (softmax
    over all synonym rows jointly, then max), which is what a background probability threshold
    should see; on logits the argmax is the same.

    Args:
        scores: B x S x ... (e.g. B x S x H x W) scores against ``text.classifier``.
        text: the vocabulary's embeddings.

    Returns:
        B x K x ... scores per class.

    Raises:
        ValueError: dim 1 of `scores` does not match the number of classifier rows.
    """
    rows = text.classifier.shape[0]
    if scores.ndim < 2 or scores.shape[1] != rows:
        raise ValueError(
            f"scores must be B x {rows} x ... (one score per row of text.classifier, "
            f"synonym_reduce={text.synonym_reduce!r}), got shape {tuple(scores.shape)}."
        )
    if text.synonym_reduce != "max" or rows == text.num_classes:
        return scores
    index = text.class_index.to(scores.device).view(1, rows, *([1] * (scores.ndim - 2)))
    out_shape = (scores.shape[0], text.num_classes, *scores.shape[2:])
    out = scores.new_full(out_shape, float("-inf"))
    return out.scatter_reduce(1, index.expand_as(scores), scores, reduce="amax", include_self=False)


__all__ = [
    "TEMPLATES",
    "TextEmbeddings",
    "default_cache_dir",
    "encode_vocabulary",
    "ensemble_templates",
    "parse_classes",
    "read_class_file",
    "reduce_synonym_logits",
    "resolve_templates",
]
