"""A trained method as one safetensors file: its name, its config, the backbone it was trained
on, and its trained tensors (exactly the method's `state_dict()`; the frozen CLIP is not in it).

    save_method(method, "runs/zc/last.safetensors", backbone)
    method = load_method("runs/zc/last.safetensors", backbone, method="zegclip")

Loading refuses a file made for another method or for another backbone (compared by the
backbone's weight fingerprint, so a hub id and a local copy of the same weights agree).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from zegkit.backbone import ClipBackbone
from zegkit.io import atomic_write, jsonable
from zegkit.methods import Method, create_method, method_name

CHECKPOINT_FORMAT = "1"  # bump when the header's meaning changes
HEADER_KEYS = ("zegkit_method_format", "method", "config", "backbone", "backbone_fingerprint")


def _json_config(method: Method) -> str:
    return json.dumps(jsonable(asdict(method.config)), sort_keys=True)


def save_method(method: Method, path: str | os.PathLike, backbone: ClipBackbone) -> Path:
    """Write `method` (config + trained tensors) for `backbone` to `path`, atomically.

    Returns:
        The path written.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "zegkit_method_format": CHECKPOINT_FORMAT,
        "method": method_name(method),
        "config": _json_config(method),
        "backbone": backbone.name,
        "backbone_fingerprint": backbone.fingerprint,
    }
    tensors = {
        key: value.detach().to("cpu").clone().contiguous()
        for key, value in method.state_dict().items()
    }
    with atomic_write(path, "wb") as handle:
        handle.write(save(tensors, metadata=header))
    return path


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The header of a method checkpoint (method, config, backbone, ...).

    Raises:
        FileNotFoundError: no file at `path`.
        RuntimeError: the file is not a zegkit method checkpoint.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"No method checkpoint at {str(path)!r}; pass the .safetensors file that "
            "`zegkit train` wrote (e.g. runs/<name>/last.safetensors)."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
    except (OSError, SafetensorError) as error:
        raise RuntimeError(f"{str(path)!r} is not a readable safetensors file ({error}).") from None
    missing = [key for key in HEADER_KEYS if key not in header]
    if missing:
        raise RuntimeError(
            f"{str(path)!r} is not a zegkit method checkpoint (its header lacks {missing}); "
            "method checkpoints are written by zegkit.methods.checkpoint.save_method."
        )
    return header


def _config_values(header: dict[str, str]) -> dict[str, object]:
    """The saved config; JSON lists back to the tuples config dataclasses use."""
    config = json.loads(header["config"])
    return {key: tuple(v) if isinstance(v, list) else v for key, v in config.items()}


def configure_method(path: str | os.PathLike, *, method: str | None = None,
                     **overrides: object) -> Method:
    """The method saved at `path` with its saved config and `overrides`, not yet built: all of a
    checkpoint that can be checked before a backbone loads (`load_trained` finishes it).

    Args:
        path: a file written by `save_method`.
        method: the method name the caller expects (None: whatever the file holds).
        **overrides: config settings that replace the saved ones (None values ignored).

    Raises:
        FileNotFoundError / RuntimeError: see `read_header`; also a file for another method.
        ValueError: an override the method has no setting for, or of the wrong type.
    """
    header = read_header(path)
    saved = header["method"]
    if method is not None and method != saved:
        raise RuntimeError(
            f"{str(path)!r} is a checkpoint of method {saved!r}, not {method!r}; run it with "
            f"--method {saved} (or pass a {method} checkpoint)."
        )
    return create_method(saved, **{**_config_values(header), **overrides})


def load_trained(built: Method, path: str | os.PathLike, backbone: ClipBackbone) -> Method:
    """Build `built` (`configure_method` of `path`) for `backbone` and load its trained tensors.

    Raises:
        FileNotFoundError / RuntimeError: see `read_header`; also a file for another backbone
            (the message names both), or tensors that do not fit the method.
    """
    header = read_header(path)
    if header["backbone_fingerprint"] != backbone.fingerprint:
        raise RuntimeError(
            f"{str(path)!r} was trained on backbone {header['backbone']!r}, but the loaded "
            f"backbone is {backbone.name!r} (other weights); load the backbone it was trained on "
            f"(--model {header['backbone']})."
        )
    built.build(backbone)
    with safe_open(str(Path(path).expanduser()), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    try:
        built.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise RuntimeError(
            f"{str(path)!r} does not fit method {header['method']!r}: {error}"
        ) from None
    return built.to(backbone.device)


def load_method(
    path: str | os.PathLike,
    backbone: ClipBackbone,
    *,
    method: str | None = None,
    **overrides: object,
) -> Method:
    """Rebuild the method saved at `path` for `backbone` and load its trained tensors
    (`configure_method`, then `load_trained`).

    Args:
        path: a file written by `save_method`.
        backbone: the CLIP to run on; must be the one the method was trained on.
        method: the method name the caller expects (None: whatever the file holds).
        **overrides: config settings that replace the saved ones (None values ignored).

    Raises:
        FileNotFoundError / RuntimeError: see `read_header`; also a file for another method or
            another backbone (the message names both), or tensors that do not fit the method.
        ValueError: an override the method has no setting for, or of the wrong type.
    """
    return load_trained(configure_method(path, method=method, **overrides), path, backbone)


__all__ = ["CHECKPOINT_FORMAT", "configure_method", "load_method", "load_trained", "read_header",
           "save_method"]
