"""zegkit: zero-shot / open-vocabulary semantic segmentation with CLIP."""
