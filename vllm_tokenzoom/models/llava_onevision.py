"""LLaVA-OneVision with tokenzoom's stages (the EVS pattern of vLLM 0.32 before the LLM, the
decoder-loop hook inside it).

- Processor side: :class:`TokenZoomProcessingInfo` reports the reduced placeholder count,
  a function of frame count and settings only (``PreLLMPolicy.num_kept_tokens``), so the
  prompt has exactly as many video placeholders as the model will produce embeddings.
- Encoder: the stock vision tower, projector and pooling, then the pre-LLM policy (TTM or a
  baseline). Each video's embeddings carry what was kept (``tokenzoom_kept``: frames and
  cells), which the worker's request session reads from vLLM's encoder cache into its token
  map. LLaVA-OneVision's LM uses 1-D RoPE: positions are contiguous over the kept tokens.
- LLM: :meth:`TokenZoomLlavaOnevision.forward` hands a step in which rows may die (a prefill
  policy deciding, or replaying stored death layers) to the decoder loop of
  ``decoder_loop.py``; other steps run the stock (possibly compiled) language model with
  the compacted layers' metadata installed up front.

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
from vllm_tokenzoom.methods.base import KeptTokens
from vllm_tokenzoom.models.decoder_loop import forward_dropping_rows
from vllm_tokenzoom.patches import HF_CONFIG_ATTR
from vllm_tokenzoom.v1.worker import step as steps


def config_of(hf_config, tokenizer=None):
    """The tokenzoom config the engine was configured with, or None; ``tokenizer`` resolves
    the defaults that come from it (ATA's sentence ends; the worker passes it)."""
    resolved = getattr(hf_config, HF_CONFIG_ATTR, None)
    if resolved is None:
        return None
    return parse_config({"tokenzoom": resolved}).for_model(hf_config.get_text_config().num_hidden_layers, tokenizer)


def _tokenizer(model_config):
    """The model's tokenizer (vLLM refuses ``--skip-tokenizer-init`` for this model's processor)."""
    from vllm.tokenizers.registry import cached_tokenizer_from_config

    return cached_tokenizer_from_config(model_config)


class TokenZoomProcessingInfo(LlavaOnevisionProcessingInfo):
    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        config = config_of(self.get_hf_config())
        policy = None if config is None else config.pre_llm
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
        self.tokenzoom = config_of(vllm_config.model_config.hf_config)
        if self.tokenzoom is not None and self.tokenzoom.needs_tokenizer:
            self.tokenzoom = config_of(vllm_config.model_config.hf_config, _tokenizer(vllm_config.model_config))
        self.tokenzoom_pre_llm = None if self.tokenzoom is None else self.tokenzoom.pre_llm
        # what the pre-LLM stage kept of the most recent videos (tests and debugging: `LLM.apply_model`)
        self.tokenzoom_trace: deque[KeptTokens] = deque(maxlen=64)
        lm = self.language_model.model
        self.tokenzoom_layer_names = [layer.self_attn.attn.layer_name for layer in lm.layers[lm.start_layer:lm.end_layer]]

    def _process_video_pixels(self, inputs):
        videos = super()._process_video_pixels(inputs)
        if not isinstance(videos, torch.Tensor):
            # Upstream bug (vLLM 0.32): videos of different lengths in one batch take this list
            # path, which returns [1, N, D] per video; vLLM's own sanity check wants [N, D] and
            # the engine dies. Every video is returned as [N, D] here, tokenzoom on or off.
            videos = [video[0] for video in videos]
        if self.tokenzoom is None:
            return videos
        pixels = inputs["pixel_values_videos"]
        frames = [pixels.shape[1]] * pixels.shape[0] if isinstance(pixels, torch.Tensor) else [len(v) for v in pixels]
        return [self._apply_pre_llm(video, num_frames) for video, num_frames in zip(videos, frames)]

    def _apply_pre_llm(self, video: torch.Tensor, num_frames: int) -> torch.Tensor:
        """video: [T*N + 1, D] (tokens, then the newline) -> [K + 1, D], carrying ``tokenzoom_kept``."""
        per_frame = (video.shape[0] - 1) // num_frames
        if self.tokenzoom_pre_llm is None:
            embeds, kept = video, KeptTokens.every(num_frames, per_frame, video.device)
        else:
            tokens, kept = self.tokenzoom_pre_llm.apply(video[:-1].view(num_frames, per_frame, -1))
            embeds = torch.cat((tokens, video[-1:]))
        embeds.tokenzoom_kept = kept  # read by the worker's session through vLLM's encoder cache
        self.tokenzoom_trace.append(kept)
        return embeds

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        step = steps.current()
        if step is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds, **kwargs)
        from vllm.forward_context import get_forward_context

        try:
            ctx = get_forward_context()
            step.complete_token_maps()
            if step.may_drop_rows():
                hidden = forward_dropping_rows(self.language_model.model, step, ctx, input_ids, positions,
                                               inputs_embeds)
            else:
                step.begin(ctx)
                hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds,
                                         **kwargs)
            step.finish()
            return hidden
        finally:
            steps.set_current(None)
