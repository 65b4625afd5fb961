"""zegkit: zero-shot / open-vocabulary semantic segmentation with CLIP.

    import zegkit
    segmenter = zegkit.load_segmenter("sclip", model="openai/clip-vit-base-patch16")
    result = segmenter.segment("photo.jpg", classes=["person; people", "dog", "grass", "sky"])
    result.save("out/", "photo", "photo.jpg")
"""

from zegkit.methods import list_methods
from zegkit.segmenter import Segmentation, Segmenter, load_segmenter

__version__ = "0.1.0"

__all__ = ["Segmentation", "Segmenter", "list_methods", "load_segmenter"]
