"""tokenzoom's Prometheus metrics on vLLM's ``/metrics`` (README "Metrics").

Counted where a request is rendered, in the API server process, into vLLM's registry there
(``prometheus_client``'s default, or its multiprocess collector when vLLM runs several API
servers): per video of each request, labelled by the request's pre-LLM method (``none``
without one),
- ``tokenzoom:visual_tokens_in_total``: the video's visual tokens as vanilla vLLM would
  prompt them (frames x tokens per frame);
- ``tokenzoom:visual_tokens_kept_total``: those its prompt holds after the pre-LLM stage
  (VOA: its first pass's overview).
A video the processor cache already holds reaches the engine without its pixels; its frame
count is then remembered from its first time (by its multimodal hash).
"""
from __future__ import annotations

import collections
import functools

_FRAMES: collections.OrderedDict[str, int] = collections.OrderedDict()  # mm hash -> the video's frames
_FRAMES_KEEP = 8192


@functools.lru_cache(maxsize=1)
def counters():
    from prometheus_client import Counter

    return (Counter("tokenzoom:visual_tokens_in_total", "Visual tokens of the videos requests sent, as vanilla "
                    "vLLM prompts them", ["method"]),
            Counter("tokenzoom:visual_tokens_kept_total", "Visual tokens of those videos in the prompts, after "
                    "tokenzoom's pre-LLM stage", ["method"]))


def count_rendered(engine_inputs, model_config, config) -> None:
    """engine_inputs: one request's rendered inputs; config: the tokenzoom config it runs with."""
    from vllm_tokenzoom.models.llava_onevision import frame_tokens

    method = next((name for name, p in config.methods.items() if p is config.pre_llm), "none")
    per_frame = frame_tokens(model_config.hf_config)
    seen, kept = counters()
    for engine_input in engine_inputs:
        if not isinstance(engine_input, dict) or engine_input.get("type") != "multimodal":
            continue
        places = engine_input["mm_placeholders"].get("video", ())
        items = engine_input["mm_kwargs"].get("video", ())
        hashes = engine_input["mm_hashes"].get("video", ())
        for place, item, digest in zip(places, items, hashes):
            frames = _frames(item, digest)
            if frames is not None:
                seen.labels(method).inc(frames * per_frame)
            kept.labels(method).inc(place.length - 1)  # the video's newline is not a visual token


def _frames(item, digest: str) -> int | None:
    if item is not None and "pixel_values_videos" in item:
        _FRAMES[digest] = int(item["pixel_values_videos"].data.shape[0])
        _FRAMES.move_to_end(digest)
        while len(_FRAMES) > _FRAMES_KEEP:
            _FRAMES.popitem(last=False)
    return _FRAMES.get(digest)
