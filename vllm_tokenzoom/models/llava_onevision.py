"""LLaVA-OneVision with tokenzoom's pre-LLM stage (TTM or a baseline), the EVS pattern of vLLM 0.32.

- Processor side: :class:`TokenZoomProcessingInfo` reports the reduced placeholder count,
  a function of frame count and settings only (e.g. ``TTM.num_kept_tokens``), so the prompt
  has exactly as many video placeholders as the model will produce embeddings.
- Model side: :class:`TokenZoomLlavaOnevision` runs the stock vision tower, projector and
  pooling, then applies the pre-LLM policy (e.g. keeps the tokens TTM's plan chooses). LLaVA-OneVision's LM uses 1-D RoPE,
  so positions are simply contiguous over the kept tokens (as in DyCoke's code).

With tokenzoom off (no ``tokenzoom`` attribute on the HF config) both are the stock classes.
"""
from __future__ import annotations

from collections import deque

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenzoom.config import parse_config
from vllm_tokenzoom.patches import HF_CONFIG_ATTR


def pre_llm_of(hf_config):
    """The pre-LLM policy (TTM or a baseline) the engine was configured with, or None."""
    resolved = getattr(hf_config, HF_CONFIG_ATTR, None)
    if resolved is None:
        return None
    return parse_config({"tokenzoom": resolved}).pre_llm


class TokenZoomProcessingInfo(LlavaOnevisionProcessingInfo):
    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        policy = pre_llm_of(self.get_hf_config())
        if policy is None:
            return super().get_num_video_tokens(
                image_width=image_width, image_height=image_height, num_frames=num_frames
            )
        per_frame = self._get_num_frame_tokens(image_width=image_width, image_height=image_height)
        return policy.num_kept_tokens(num_frames, per_frame) + 1  # + the video's one newline token


@MULTIMODAL_REGISTRY.register_processor(
    LlavaOnevisionMultiModalProcessor,
    info=TokenZoomProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class TokenZoomLlavaOnevision(LlavaOnevisionForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenzoom_pre_llm = pre_llm_of(vllm_config.model_config.hf_config)
        # visual indices kept for the most recent videos (tests and debugging; `LLM.apply_model`;
        # None for spatial pooling, whose tokens are new)
        self.tokenzoom_trace: deque[torch.Tensor] = deque(maxlen=64)

    def _process_video_pixels(self, inputs):
        videos = super()._process_video_pixels(inputs)
        if not isinstance(videos, torch.Tensor):
            # Upstream bug (vLLM 0.32): videos of different lengths in one batch take this list
            # path, which returns [1, N, D] per video; vLLM's own sanity check wants [N, D] and
            # the engine dies. Every video is returned as [N, D] here, tokenzoom on or off.
            videos = [video[0] for video in videos]
        if self.tokenzoom_pre_llm is None:
            return videos
        pixels = inputs["pixel_values_videos"]
        frames = [pixels.shape[1]] * pixels.shape[0] if isinstance(pixels, torch.Tensor) else [len(v) for v in pixels]
        pruned = [self._apply_pre_llm(video, num_frames) for video, num_frames in zip(videos, frames)]
        return torch.stack(pruned) if isinstance(videos, torch.Tensor) else pruned

    def _apply_pre_llm(self, video: torch.Tensor, num_frames: int) -> torch.Tensor:
        """video: [T*N + 1, D] (tokens, then the newline) -> [K + 1, D]."""
        per_frame = (video.shape[0] - 1) // num_frames
        kept, visual_idx = self.tokenzoom_pre_llm.apply(video[:-1].view(num_frames, per_frame, -1))
        self.tokenzoom_trace.append(visual_idx)
        return torch.cat((kept, video[-1:]))
