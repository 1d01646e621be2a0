"""Test hook (imported by the offline child before its engine starts): records how many frames
each call of LLaVA-OneVision's vision tower encodes. ``report()``: the list of frame counts."""
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

_FRAMES: list[int] = []
_original = LlavaOnevisionForConditionalGeneration._video_pixels_to_features


def _video_pixels_to_features(self, vision_tower, pixel_values, *args, **kwargs):
    _FRAMES.append(int(pixel_values.shape[0]))  # [frames of every video in the call, C, H, W]
    return _original(self, vision_tower, pixel_values, *args, **kwargs)


LlavaOnevisionForConditionalGeneration._video_pixels_to_features = _video_pixels_to_features


def report():
    return _FRAMES
