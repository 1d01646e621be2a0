"""LLaVA-OneVision with tokenzoom's stages (the EVS pattern of vLLM 0.32 before the LLM, the
decoder-loop hook inside it).

- Processor side: :class:`TokenZoomProcessor` gives each video the reduced placeholder count,
  a function of frame count and settings only (``PreLLMPolicy.num_kept_tokens``) -- the
  request's own settings where it sent some (``requests.py``), else the engine's -- so the
  prompt has exactly as many video placeholders as the model will produce embeddings.
  Outside a request (vLLM sizing its encoder cache and profiling) a video counts as many
  tokens as in vanilla vLLM: tokenzoom never lets a request carry less than vanilla's.
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

import contextlib
import dataclasses
import math
from collections import deque

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_tokenzoom import requests
from vllm_tokenzoom.config import parse_config
from vllm_tokenzoom.methods.base import KeptTokens
from vllm_tokenzoom.models import tower_memo
from vllm_tokenzoom.models.decoder_loop import forward_dropping_rows
from vllm_tokenzoom.engine import HF_CONFIG_ATTR
from vllm_tokenzoom.v1.worker import step as steps


def config_of(hf_config, tokenizer=None, text: str | None = None):
    """The tokenzoom config a request runs with: its own (``text``, ``requests.canonical``:
    checked where it entered), else the engine's; None when tokenzoom is off. ``tokenizer``
    resolves the defaults that come from it (ATA's sentence ends; the worker passes it)."""
    resolved = getattr(hf_config, HF_CONFIG_ATTR, None)
    if resolved is None:
        return None
    layers = hf_config.get_text_config().num_hidden_layers
    if text is not None:
        return requests.parsed(text, layers, tokenizer)
    return parse_config({"tokenzoom": resolved}).for_model(layers, tokenizer)


def frame_tokens(hf_config) -> int:
    """Visual tokens of one video frame at full resolution: the tower's patch grid, pooled 2x
    per side by OneVision (384 px, patch 14: 27 x 27 -> 14 x 14 = 196)."""
    vision = hf_config.vision_config
    return math.ceil(vision.image_size // vision.patch_size / 2) ** 2


def _tokenizer(model_config):
    """The model's tokenizer (vLLM refuses ``--skip-tokenizer-init`` for this model's processor)."""
    from vllm.tokenizers.registry import cached_tokenizer_from_config

    return cached_tokenizer_from_config(model_config)


@contextlib.contextmanager
def _one_host_thread(tensor: torch.Tensor):
    """A pre-LLM policy's few small ops on CPU run in one thread. On cores shared with another
    process (vLLM's API server decoding videos next to the engine, or another job) every
    parallel region waits for a descheduled sibling thread: TTM on 16 frames took 66 ms with 2
    threads vs 2.4 ms with one, on 2 cores shared with a training run (docs/measurements.md)."""
    threads = torch.get_num_threads()
    if tensor.device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TokenZoomProcessingInfo(LlavaOnevisionProcessingInfo):
    def num_video_tokens(self, config, *, image_width: int, image_height: int, num_frames: int) -> int:
        """A video's placeholder count under ``config`` (None: tokenzoom off) -- its pre-LLM policy."""
        policy = None if config is None else config.pre_llm
        if policy is None:
            return self.get_num_video_tokens(image_width=image_width, image_height=image_height, num_frames=num_frames)
        per_frame = self._get_num_frame_tokens(image_width=image_width, image_height=image_height)
        return policy.num_kept_tokens(num_frames, per_frame) + 1  # + the video's one newline token


class TokenZoomProcessor(LlavaOnevisionMultiModalProcessor):
    """The stock processor, with each video's placeholder count from the request's pre-LLM policy
    and the request's setting handed to the model per video (``requests.PRE_LLM_FIELD``)."""

    def _get_hf_mm_inputs(self, mm_items, hf_kwargs):
        # tokenzoom's key never reaches the HF processor (nor its processor cache)
        return super()._get_hf_mm_inputs(mm_items, {k: v for k, v in hf_kwargs.items() if k != requests.MM_KEY})

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        _refuse_empty_videos(mm_items)
        out = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        text = hf_kwargs.get(requests.MM_KEY)
        videos = mm_items.get_all_counts().get("video", 0)
        if text is not None and videos:
            code = torch.tensor(list(str(text).encode()), dtype=torch.uint8)  # [L] the canonical JSON
            out[requests.PRE_LLM_FIELD] = code[None].expand(videos, -1).clone()  # [videos, L]
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
                requests.PRE_LLM_FIELD: MultiModalFieldConfig.batched("video", keep_on_cpu=True)}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        from vllm.multimodal.parse import VideoEmbeddingItems, VideoProcessorItems

        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        text = hf_processor_mm_kwargs.get(requests.MM_KEY)
        config = config_of(self.info.get_hf_config(), text=None if text is None else str(text))

        def video_replacement(item_idx: int):
            videos = mm_items.get_items("video", (VideoEmbeddingItems, VideoProcessorItems))
            if isinstance(videos, VideoEmbeddingItems):
                count = videos.get_feature_size(item_idx)
            else:
                size = videos.get_frame_size(item_idx)
                count = self.info.num_video_tokens(config, image_width=size.width, image_height=size.height,
                                                   num_frames=videos.get_num_frames(item_idx))
            return [self.info.get_hf_config().video_token_index] * count

        return [dataclasses.replace(u, replacement=video_replacement) if u.modality == "video" else u
                for u in updates]


def _refuse_empty_videos(mm_items) -> None:
    """A video with no decodable frame (an empty or broken file, or a one-frame mp4 some encoders
    write without a decodable frame) is the request's error, said as such (the HF processor says
    "Cannot get size of empty video")."""
    from vllm.multimodal.parse import VideoProcessorItems

    videos = mm_items.get("video") if hasattr(mm_items, "get") else None
    if not isinstance(videos, VideoProcessorItems):
        return
    for i in range(videos.get_count()):
        if videos.get_num_frames(i) == 0:
            raise ValueError(f"video {i} of the request has no decodable frame; send a video with at least one")


@MULTIMODAL_REGISTRY.register_processor(
    TokenZoomProcessor,
    info=TokenZoomProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class TokenZoomLlavaOnevision(LlavaOnevisionForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenzoom = config_of(vllm_config.model_config.hf_config)
        if self.tokenzoom is not None and self.tokenzoom.needs_tokenizer:
            self.tokenzoom = config_of(vllm_config.model_config.hf_config, _tokenizer(vllm_config.model_config))
        self.tokenzoom_model_config = vllm_config.model_config
        self.tokenzoom_videos: list[str] | None = None  # the current encoder call's per-video settings
        # what the pre-LLM stage kept of the most recent videos (tests and debugging: `LLM.apply_model`)
        self.tokenzoom_trace: deque[KeptTokens] = deque(maxlen=64)
        self.tokenzoom_tower = tower_memo.TowerMemo()  # vision-path outputs kept for a request's next pass
        lm = self.language_model.model
        self.tokenzoom_layer_names = [layer.self_attn.attn.layer_name for layer in lm.layers[lm.start_layer:lm.end_layer]]

    def tokenzoom_for(self, text: str | None):
        """The config a request runs with: its own (``requests.canonical``), or the engine's."""
        if text is None or self.tokenzoom is None:
            return self.tokenzoom
        hf_config = self.tokenzoom_model_config.hf_config
        config = config_of(hf_config, text=text)
        return config_of(hf_config, _tokenizer(self.tokenzoom_model_config), text) if config.needs_tokenizer else config

    def embed_multimodal(self, **kwargs):
        codes = kwargs.pop(requests.PRE_LLM_FIELD, None)  # per video: the request's own setting, if any
        self.tokenzoom_videos = None if codes is None else [bytes(c.tolist()).decode() for c in codes]
        return super().embed_multimodal(**kwargs)

    def _process_video_pixels(self, inputs):
        pixels = inputs["pixel_values_videos"]
        frames = [pixels.shape[1]] * pixels.shape[0] if isinstance(pixels, torch.Tensor) else [len(v) for v in pixels]
        if self.tokenzoom is None:
            return self._vision_path(inputs)
        own = self.tokenzoom_videos or [None] * len(frames)
        policies = [self.tokenzoom_for(text).pre_llm for text in own]
        used = [None if p is None else p.frames_used(t) for p, t in zip(policies, frames)]
        reuse = [None if p is None else p.tower_reuse() for p in policies]
        if any(r is not None for r in reuse):
            videos = self._vision_path_once(pixels, used, reuse)
        elif any(u is not None for u in used):  # the tower runs on the frames a policy reads only
            # the stock method reads only the pixels (a plain mapping serves it)
            videos = self._vision_path({"pixel_values_videos": [v if u is None else v[u] for v, u in zip(pixels, used)]})
        else:
            videos = self._vision_path(inputs)
        return [self._apply_pre_llm(self._all_frames(video, t, u), t, p)
                for video, t, u, p in zip(videos, frames, used, policies)]

    def _vision_path(self, inputs):
        """The stock tower, projector and pooling: per video [F * N + 1, D] (a list, or a batched tensor)."""
        videos = super()._process_video_pixels(inputs)
        if not isinstance(videos, torch.Tensor):
            # Upstream bug (vLLM 0.32): videos of different lengths in one batch take this list
            # path, which returns [1, N, D] per video; vLLM's own sanity check wants [N, D] and
            # the engine dies. Every video is returned as [N, D] here, tokenzoom on or off.
            videos = [video[0] for video in videos]
        return videos

    def _vision_path_once(self, pixels, used, reuse) -> list[torch.Tensor]:
        """The vision path, each frame once per request: what a first pass keeps a second takes."""
        keys = [None if r is None else tower_memo.key_of(v, u) for v, u, r in zip(pixels, used, reuse)]
        videos = [self.tokenzoom_tower.take(k, v.device) if r == "take" else None
                  for k, r, v in zip(keys, reuse, pixels)]
        todo = [i for i, video in enumerate(videos) if video is None]
        if todo:
            selected = [pixels[i] if used[i] is None else pixels[i][used[i]] for i in todo]
            for i, video in zip(todo, self._vision_path({"pixel_values_videos": selected})):
                videos[i] = video
                if reuse[i] == "keep":
                    self.tokenzoom_tower.keep(keys[i], video)
        return videos

    @staticmethod
    def _all_frames(video: torch.Tensor, num_frames: int, used: list[int] | None) -> torch.Tensor:
        """video: [F * N + 1, D] over the frames ``used`` -> [T * N + 1, D], zeros in the frames not used."""
        if used is None or len(used) == num_frames:
            return video
        per_frame = (video.shape[0] - 1) // len(used)
        full = video.new_zeros(num_frames, per_frame, video.shape[-1])
        full[torch.tensor(used, device=video.device)] = video[:-1].view(len(used), per_frame, -1)
        return torch.cat((full.flatten(0, 1), video[-1:]))

    def _apply_pre_llm(self, video: torch.Tensor, num_frames: int, policy) -> torch.Tensor:
        """video: [T*N + 1, D] (tokens, then the newline) -> [K + 1, D], carrying ``tokenzoom_kept``."""
        per_frame = (video.shape[0] - 1) // num_frames
        if policy is None:
            embeds, kept = video, KeptTokens.every(num_frames, per_frame, video.device)
        else:
            with _one_host_thread(video):
                tokens, kept = policy.apply(video[:-1].view(num_frames, per_frame, -1))
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
