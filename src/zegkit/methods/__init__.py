"""Methods by name: `create_method("sclip", logit_scale=50)`, `list_methods()`.

An explicit name -> (config dataclass, method class) table; no registry decorators.
"""

from __future__ import annotations

from dataclasses import fields, replace

from zegkit.config import check_setting_types
from zegkit.methods.base import Method, MethodConfig
from zegkit.methods.cascade_clip import CascadeCLIP, CascadeCLIPConfig
from zegkit.methods.clearclip import ClearCLIP, ClearCLIPConfig
from zegkit.methods.clip_rc import CLIPRC, CLIPRCConfig
from zegkit.methods.cliper import CLIPer, CLIPerConfig
from zegkit.methods.clsclip import ClsCLIP, ClsCLIPConfig
from zegkit.methods.clsclip_standin import ClsCLIPStandin, ClsCLIPStandinConfig
from zegkit.methods.maskclip import MaskCLIP, MaskCLIPConfig
from zegkit.methods.naclip import NACLIP, NACLIPConfig
from zegkit.methods.naive import Naive, NaiveConfig
from zegkit.methods.pacl import PACL, PACLConfig
from zegkit.methods.sclip import SCLIP, SCLIPConfig
from zegkit.methods.zegclip import ZegCLIP, ZegCLIPConfig

METHODS: dict[str, tuple[type, type[Method]]] = {
    "naive": (NaiveConfig, Naive),
    "maskclip": (MaskCLIPConfig, MaskCLIP),
    "sclip": (SCLIPConfig, SCLIP),
    "clearclip": (ClearCLIPConfig, ClearCLIP),
    "naclip": (NACLIPConfig, NACLIP),
    "cliper": (CLIPerConfig, CLIPer),
    "clsclip_standin": (ClsCLIPStandinConfig, ClsCLIPStandin),
    "clsclip": (ClsCLIPConfig, ClsCLIP),
    "zegclip": (ZegCLIPConfig, ZegCLIP),
    "pacl": (PACLConfig, PACL),
    "cascade_clip": (CascadeCLIPConfig, CascadeCLIP),
    "clip_rc": (CLIPRCConfig, CLIPRC),
}


def create_method(name: str, **overrides: object) -> Method:
    """Build method `name` from its default config with keyword `overrides` (None values ignored).

    Raises:
        ValueError: unknown method name or unknown config field, listing the valid ones; a value
            of the wrong type for its field (e.g. a string for a number).
    """
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; available: {', '.join(sorted(METHODS))}.")
    config_class, method_class = METHODS[name]
    valid = {f.name for f in fields(config_class)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(
            f"Method {name!r} has no setting(s) {unknown}; its settings are {sorted(valid)}."
        )
    check_setting_types(config_class, overrides, f"Method {name!r}")
    config = replace(config_class(), **{k: v for k, v in overrides.items() if v is not None})
    return method_class(config)


def method_name(method: Method) -> str:
    """The name `create_method` knows `method` by.

    Raises:
        ValueError: a method class that is not in METHODS.
    """
    for name, (_, method_class) in METHODS.items():
        if type(method) is method_class:
            return name
    raise ValueError(f"{type(method).__name__} is not a registered method ({sorted(METHODS)}).")


def list_methods() -> dict[str, str]:
    """Method names with their one-line descriptions."""
    return {name: method.description for name, (_, method) in METHODS.items()}


__all__ = ["METHODS", "Method", "MethodConfig", "create_method", "list_methods", "method_name"]
