"""Find and load a CLIP model and its tokenizer, from wherever the user keeps them.

One resolver, one precedence (first match wins):

1. a shipped short name (`SHIPPED_MODELS`, e.g. "zegkit/tiny-synthetic"): files inside the package;
2. an existing local directory in Hugging Face format (config.json + weights + tokenizer files);
3. an existing local file: an OpenAI TorchScript archive (`~/.cache/clip/ViT-B-16.pt`), a plain
   state dict (.pt / .pth / .bin, read with `weights_only=True`) or .safetensors, in the OpenAI /
   open_clip layout, converted by `convert.convert_openai_state_dict`;
4. a Hugging Face hub id, via `from_pretrained`, which honours `HF_HUB_OFFLINE=1` and the cache.

A checkpoint file holds no tokenizer: it comes from `tokenizer_source`, or, for OpenAI's file
names, from the matching hub repository (cached or downloadable). Models load in fp32, in eval
mode, with gradients off. Loading never falls back to random weights: a missing or misshapen
tensor is an error naming it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError
from safetensors.torch import load_file

from zegkit.backbone import DEFAULT_MODEL
from zegkit.backbone.convert import TOKEN_EMBEDDING_KEY, convert_openai_state_dict
from zegkit.backbone.tokenizer import check_tokenizer

if TYPE_CHECKING:  # imported where used: `transformers` takes seconds to import
    from transformers import CLIPModel, PreTrainedTokenizerBase

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
# Models that ship inside the package; their folders are HF-format model directories.
SHIPPED_MODELS: dict[str, Path] = {"zegkit/tiny-synthetic": ASSETS_DIR / "tiny-synthetic"}
# File names OpenAI's `clip` package downloads (clip/clip.py `_MODELS`) -> the hub repository
# holding the same model, whose tokenizer we pair with the file.
OPENAI_CHECKPOINT_REPOS = {
    "ViT-B-32.pt": "openai/clip-vit-base-patch32",
    "ViT-B-16.pt": "openai/clip-vit-base-patch16",
    "ViT-L-14.pt": "openai/clip-vit-large-patch14",
    "ViT-L-14-336px.pt": "openai/clip-vit-large-patch14-336",
    "ViT-L-14-336.pt": "openai/clip-vit-large-patch14-336",
}
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# The weight files of a Hugging Face model directory, in the order transformers prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CLIP_MODEL_TYPE = "clip"  # config.json "model_type" of transformers' CLIPModel
DEFAULT_ACTIVATION = "quick_gelu"  # OpenAI CLIP's MLP activation
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "namespace/name"
_TOKENIZER_FILES = "tokenizer.json, or vocab.json + merges.txt"
_READ_ERRORS = (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError,
                zipfile.BadZipFile, SafetensorError)


class _Source(NamedTuple):
    """Where a model lives: `kind` is "hf" (directory or hub id) or "checkpoint" (a file)."""

    kind: str
    location: str | Path
    name: str


def load_clip_model(
    source: str | os.PathLike,
    *,
    tokenizer_source: str | os.PathLike | None = None,
    hidden_act: str | None = None,
) -> tuple[CLIPModel, PreTrainedTokenizerBase, str]:
    """Load a frozen fp32 CLIP and its tokenizer from a shipped name, directory, file or hub id.

    Precedence (first match wins): shipped short name (`SHIPPED_MODELS`) > existing local
    directory (Hugging Face format) > existing local file (OpenAI / open_clip checkpoint:
    TorchScript archive, .pt/.pth/.bin state dict, .safetensors) > Hugging Face hub id. An
    `os.PathLike` source is always a local path.

    Args:
        source: what to load, e.g. "openai/clip-vit-base-patch16", "~/.cache/clip/ViT-B-16.pt",
            a directory written by `CLIPModel.save_pretrained`, or "zegkit/tiny-synthetic".
        tokenizer_source: local directory or hub id of the tokenizer; overrides the one next to
            the model. Required for checkpoint files whose name is not one of OpenAI's.
        hidden_act: MLP activation of a checkpoint file ("quick_gelu", OpenAI's and the default,
            or "gelu" for open_clip models trained without QuickGELU). Hugging Face configs name
            their own activation, so it is an error to pass it for them.

    Returns:
        (model in eval mode with requires_grad False, tokenizer whose `model_max_length` is the
        text context length, resolved name of the weights).

    Raises:
        FileNotFoundError: a local path does not exist, or files are not on disk / in the cache.
        ValueError: not a CLIP, an unsupported file, or a checkpoint without a tokenizer source.
        RuntimeError: weights missing from or misshapen for the config; a broken tokenizer.
    """
    resolved = _resolve(source)
    if resolved.kind == "checkpoint":
        model, tokenizer, tokenizer_name = _load_checkpoint(
            Path(resolved.location), tokenizer_source, hidden_act or DEFAULT_ACTIVATION)
    else:
        if hidden_act is not None:
            raise ValueError(
                f"hidden_act applies only to checkpoint files; {resolved.name!r} has a config.json "
                "that names its activation. Drop hidden_act, or edit that config."
            )
        model, tokenizer, tokenizer_name = _load_hf(resolved, tokenizer_source)
    return _finish(model, tokenizer, tokenizer_name), tokenizer, resolved.name


# --------------------------------------------------------------------------- resolving sources


def _resolve(source: str | os.PathLike) -> _Source:
    """Apply the precedence: shipped name > local directory > local file > hub id."""
    if isinstance(source, str) and source in SHIPPED_MODELS:
        return _shipped(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _Source("hf", path, str(path))
    if path.is_file():
        return _Source("checkpoint", path, str(path))
    if isinstance(source, str) and _looks_like_hub_id(source):
        return _Source("hf", source, source)
    raise FileNotFoundError(
        f"No such file or directory: {str(path)!r}. A CLIP source is one of: a shipped name "
        f"{sorted(SHIPPED_MODELS)}, a Hugging Face model directory, a checkpoint file "
        f"({', '.join(CHECKPOINT_SUFFIXES)}), or a hub id such as openai/clip-vit-base-patch16."
    )


def _shipped(name: str) -> _Source:
    """A model that ships in the package; its folder must exist in this installation."""
    folder = SHIPPED_MODELS[name]
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"The shipped model {name!r} is missing from this installation (expected its files "
            f"in {folder}). Reinstall zegkit (pip install --force-reinstall zegkit), or use "
            "another model, e.g. openai/clip-vit-base-patch16."
        )
    return _Source("hf", folder, name)


def _looks_like_hub_id(text: str) -> bool:
    """True for "name" or "namespace/name" that is not spelled like a local checkpoint file."""
    return bool(_HUB_ID.match(text)) and not text.lower().endswith(CHECKPOINT_SUFFIXES)


def hub_offline() -> bool:
    """Whether Hugging Face loaders may use only the local cache (HF_HUB_OFFLINE is set)."""
    return bool(hub_constants.HF_HUB_OFFLINE)


def _offline_note() -> str:
    """Explain where the hub loader looked, depending on HF_HUB_OFFLINE."""
    if hub_offline():
        return (f"HF_HUB_OFFLINE=1 is set, so only the local cache ({hub_constants.HF_HUB_CACHE}) "
                "was searched")
    return ("it is neither in the local cache nor downloadable (check the id and your network; "
            "set HF_HUB_OFFLINE=1 to use only the cache)")


# --------------------------------------------------------------------------- Hugging Face format


def _load_hf(resolved: _Source, tokenizer_source: str | os.PathLike | None,
             ) -> tuple[CLIPModel, PreTrainedTokenizerBase, str]:
    """Load a Hugging Face-format CLIP (directory or hub id) and its tokenizer."""
    from transformers import CLIPModel

    _check_model_type(resolved)
    try:
        with _quiet_progress():
            model, info = CLIPModel.from_pretrained(
                resolved.location, dtype=torch.float32, output_loading_info=True,
                ignore_mismatched_sizes=True)
    except (SafetensorError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile,
            RuntimeError) as err:  # torch's RuntimeError: a truncated pytorch_model.bin
        raise RuntimeError(_unreadable_weights_message(resolved, err)) from None
    except OSError as err:
        raise FileNotFoundError(_missing_model_message(resolved, "weights")) from err
    _check_loading_info(info, resolved.name)
    tokenizer_location = resolved.location if tokenizer_source is None else tokenizer_source
    tokenizer, tokenizer_name = _load_tokenizer(tokenizer_location, resolved.name)
    return model, tokenizer, tokenizer_name


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' "Loading weights" bar (printed on every run) while loading, then put
    back whatever the caller had set."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _unreadable_weights_message(resolved: _Source, error: Exception) -> str:
    """Name the weights file that cannot be read (truncated, empty, corrupt, or pickled code)."""
    where = repr(resolved.name)
    if isinstance(resolved.location, Path):
        present = [name for name in HF_WEIGHT_FILES if (resolved.location / name).is_file()]
        where = str(resolved.location / present[0]) if present else where
    return (
        f"Could not read the model weights {where}: {error}. The file is empty, truncated or "
        "corrupt, or a pickle holding more than tensors (zegkit never runs pickled code); "
        "re-download it (`hf download <repo> --local-dir DIR`) or write it again with "
        "CLIPModel.save_pretrained(DIR)."
    )


def _check_model_type(resolved: _Source) -> None:
    """Read config.json and refuse anything that is not a `transformers` CLIPModel."""
    from transformers import PretrainedConfig

    if isinstance(resolved.location, Path) and not (resolved.location / "config.json").is_file():
        files = sorted(p.name for p in resolved.location.iterdir())
        raise FileNotFoundError(
            f"{resolved.name!r} is a directory without config.json, so not a Hugging Face model "
            f"directory (it holds {files[:10]}). Write one with CLIPModel.save_pretrained(DIR) "
            "or `hf download <repo> --local-dir DIR`; to load a checkpoint file, pass the file."
        )
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(resolved.location)
    except OSError as err:
        raise FileNotFoundError(_missing_model_message(resolved, "config")) from err
    model_type = config_dict.get("model_type")
    if model_type != CLIP_MODEL_TYPE:
        raise ValueError(
            f"{resolved.name!r} is not a CLIP model: its config.json has model_type "
            f"{model_type!r}, zegkit needs {CLIP_MODEL_TYPE!r}. Accepted: transformers CLIPModel "
            "repositories or directories (e.g. openai/clip-vit-base-patch16, "
            "openai/clip-vit-large-patch14), OpenAI / open_clip ViT checkpoint files "
            f"({', '.join(CHECKPOINT_SUFFIXES)}), and shipped models {sorted(SHIPPED_MODELS)}."
        )


def _missing_model_message(resolved: _Source, what: str) -> str:
    """Say which files are missing and the command that fetches them."""
    if isinstance(resolved.location, Path):
        return (
            f"Could not read the model {what} in {resolved.name!r}: a Hugging Face model "
            "directory needs config.json and model.safetensors (or pytorch_model.bin). Download "
            "them with `hf download <repo> --local-dir DIR`, or write them with "
            "CLIPModel.save_pretrained(DIR)."
        )
    return (
        f"Could not load the model {what} of {resolved.name!r} from the Hugging Face hub: "
        f"{_offline_note()}. Download it once with `hf download {resolved.name}` (into the hub "
        f"cache) or `hf download {resolved.name} --local-dir DIR` and pass DIR."
    )


def _check_loading_info(info: Mapping[str, object], name: str) -> None:
    """Refuse a model with random tensors: ones missing from, or misshapen in, the file."""
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shapes = [f"{key}: file {tuple(got)} vs config {tuple(want)}"
                  for key, got, want in mismatched[:10]]
        raise RuntimeError(
            f"The weights of {name!r} do not match its config: {shapes}. The config and the "
            "weights come from different models; re-download them together."
        )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise RuntimeError(
            f"The weights of {name!r} lack {len(missing)} tensors the config needs (e.g. "
            f"{missing[:10]}); they would be random. The weights file is incomplete or belongs to "
            "another architecture; re-download it."
        )


# --------------------------------------------------------------------------- tokenizers


def _load_tokenizer(location: str | os.PathLike, model_name: str,
                    ) -> tuple[PreTrainedTokenizerBase, str]:
    """Load a tokenizer from a local directory or hub id; say what to download if absent."""
    from transformers import AutoTokenizer

    path = Path(location).expanduser()
    is_hub_id = isinstance(location, str) and not path.exists() and _looks_like_hub_id(location)
    if not is_hub_id and not path.is_dir():
        raise FileNotFoundError(
            f"Tokenizer source {str(path)!r} for {model_name!r} is not a directory. Pass a "
            f"directory holding {_TOKENIZER_FILES}, or a hub id such as "
            "openai/clip-vit-base-patch16."
        )
    name = str(location) if is_hub_id else str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location if is_hub_id else path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(_missing_tokenizer_message(name, model_name, is_hub_id)) from err
    return tokenizer, name


def _missing_tokenizer_message(name: str, model_name: str, is_hub_id: bool) -> str:
    """Name the tokenizer files to fetch, the command, and the override."""
    where = f"the hub ({_offline_note()})" if is_hub_id else "that directory"
    repo = name if is_hub_id else DEFAULT_MODEL
    return (
        f"Could not load the tokenizer for {model_name!r} from {name!r}: not found in {where}. "
        f'Download it with `hf download {repo} --include "*.json" "*.txt"` (add --local-dir DIR '
        "to keep a copy), or pass tokenizer_source=DIR (CLI: --tokenizer DIR) with "
        f"{_TOKENIZER_FILES}."
    )


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    """The tokenizer's start/end/padding ids, so the text tower pools at its end-of-text token."""
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


# --------------------------------------------------------------------------- checkpoint files


def _load_checkpoint(path: Path, tokenizer_source: str | os.PathLike | None, hidden_act: str,
                     ) -> tuple[CLIPModel, PreTrainedTokenizerBase, str]:
    """Load an OpenAI / open_clip checkpoint file: tokenizer first (cheap), then convert weights."""
    tokenizer, tokenizer_name = _load_tokenizer(_checkpoint_tokenizer(path, tokenizer_source),
                                                str(path))
    state_dict = read_state_dict(path)
    if TOKEN_EMBEDDING_KEY in state_dict:  # check before its special ids shape the config
        check_tokenizer(tokenizer, state_dict[TOKEN_EMBEDDING_KEY].shape[0], tokenizer_name)
    config, converted = convert_openai_state_dict(state_dict, hidden_act=hidden_act,
                                                  **_special_ids(tokenizer))
    from transformers import CLIPModel

    with _quiet_progress():
        model, info = CLIPModel.from_pretrained(
            None, config=config, state_dict=converted, dtype=torch.float32,
            output_loading_info=True, ignore_mismatched_sizes=True)
    _check_loading_info(info, str(path))
    return model, tokenizer, tokenizer_name


def _checkpoint_tokenizer(path: Path, tokenizer_source: str | os.PathLike | None,
                          ) -> str | os.PathLike:
    """The tokenizer for a checkpoint file: the override, else the hub repo of an OpenAI name."""
    if tokenizer_source is not None:
        return tokenizer_source
    if path.name in OPENAI_CHECKPOINT_REPOS:
        return OPENAI_CHECKPOINT_REPOS[path.name]
    raise ValueError(
        f"{path.name!r} is a checkpoint file, which holds no tokenizer, and not one of OpenAI's "
        f"file names {sorted(OPENAI_CHECKPOINT_REPOS)}. Pass tokenizer_source=DIR_OR_HUB_ID "
        "(CLI: --tokenizer); OpenAI's and most open_clip ViT models use the tokenizer of "
        "openai/clip-vit-base-patch16."
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file without executing pickled code: safetensors,
    TorchScript archives, and torch files holding a state dict or {"state_dict": ...}.

    Raises:
        ValueError: an unsupported suffix, or a file that holds no state dict.
        RuntimeError: a file that cannot be read (truncated, or pickled objects).
    """
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ValueError(
            f"Unsupported checkpoint file {path.name!r}: expected one of {CHECKPOINT_SUFFIXES} "
            "(OpenAI TorchScript archive, state dict, or safetensors), or a model directory."
        )
    try:
        if path.suffix.lower() == ".safetensors":
            return load_file(path, device="cpu")
        if _is_torchscript(path):
            return _read_torchscript(path)
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except _READ_ERRORS as err:
        raise RuntimeError(
            f"Could not read checkpoint {str(path)!r}: {err}. It may be truncated (re-download "
            "it) or hold pickled objects other than tensors (save a plain state dict instead)."
        ) from err
    return _unwrap_state_dict(contents, path)


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an OpenAI TorchScript archive (its code is never run)."""
    with warnings.catch_warnings():
        # torch >= 2.9 deprecates TorchScript; OpenAI's archives are TorchScript all the same.
        warnings.simplefilter("ignore", DeprecationWarning)
        return dict(torch.jit.load(path, map_location="cpu").state_dict())


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a `constants.pkl`; `torch.save` zips have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Take the tensors out of a training checkpoint: its "state_dict" entry, minus "module."."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{str(path)!r} does not hold a state dict (a mapping of names to tensors), nor a "
            "checkpoint with one under 'state_dict'."
        )
    prefix = "module."  # added by DistributedDataParallel
    if obj and all(key.startswith(prefix) for key in obj):
        return {key[len(prefix):]: value for key, value in obj.items()}
    return dict(obj)


# --------------------------------------------------------------------------- finishing


def _finish(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, tokenizer_name: str,
            ) -> CLIPModel:
    """Validate the tokenizer against the text tower, set its length; freeze the model in fp32."""
    text_config = model.config.text_config
    check_tokenizer(tokenizer, text_config.vocab_size, tokenizer_name)
    tokenizer.model_max_length = text_config.max_position_embeddings
    return model.float().eval().requires_grad_(False)
