"""zegkit: zero-shot / open-vocabulary semantic segmentation with CLIP.

    import zegkit
    segmenter = zegkit.load_segmenter("sclip", model="openai/clip-vit-base-patch16")
    result = segmenter.segment("photo.jpg", classes=["person; people", "dog", "grass", "sky"])
    result.save("out/", "photo", "photo.jpg")

The public names load on first use, so `import zegkit.data` or `zegkit.evaluate` does not pay for
importing `transformers`.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "Segmentation": "zegkit.segmenter",
    "Segmenter": "zegkit.segmenter",
    "load_segmenter": "zegkit.segmenter",
    "list_methods": "zegkit.methods",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'zegkit' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)
