"""tokenzoom's Prometheus metrics on vLLM's ``/metrics`` (README "Metrics").

All are counted in the front-end process (the API server; offline, the ``LLM``'s), into vLLM's
registry there (``prometheus_client``'s default, or its multiprocess collector when vLLM runs
several API servers).

Counted where a request is rendered: per video of each request, labelled by the request's
pre-LLM method (``none`` without one),
- ``tokenzoom:visual_tokens_in_total``: the video's visual tokens as vanilla vLLM would
  prompt them (frames x tokens per frame);
- ``tokenzoom:visual_tokens_kept_total``: those its prompt holds after the pre-LLM stage
  (VOA: its first pass's overview).
A video the processor cache already holds reaches the engine without its pixels; its frame
count is then remembered from its first time (by its multimodal hash).

Counted from the in-LLM stages' figures (``v1/worker/sessions.Figures``: worker -> scheduler ->
each request's next output, ``kv_transfer_params["tokenzoom"]["figures"]``), as the front end
processes engine outputs (``take_figures``):
- ``tokenzoom:prefill_visual_rows_skipped_total`` {method}: visual-token rows the layers after a
  prefill drop did not compute, summed over those layers (FastV, VAS);
- ``tokenzoom:decode_visual_attended_ratio`` {method}: histogram, per decode step of a request
  with a decode method, the share of its visual tokens the step's query reads, averaged over
  layers (label: the request's decode methods, e.g. ``dp+ata``);
- ``tokenzoom:kv_blocks_reclaimed_total`` {method}: KV blocks given back while the request ran;
- ``tokenzoom:policy_seconds`` {method}: histogram of the time of each policy decision (on CUDA,
  the host's time to issue it).
A finished request's output carries its totals there instead (``request_totals``), e.g. offline
``RequestOutput.kv_transfer_params["tokenzoom"]["figures"]``.
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


@functools.lru_cache(maxsize=1)
def stage_metrics():
    from prometheus_client import Counter, Histogram

    shares = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
    seconds = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
    return {
        "rows": Counter("tokenzoom:prefill_visual_rows_skipped_total", "Visual-token rows the in-LLM prefill "
                        "stage did not compute, summed over layers", ["method"]),
        "share": Histogram("tokenzoom:decode_visual_attended_ratio", "Share of a request's visual tokens a "
                           "decode step reads, averaged over layers", ["method"], buckets=shares),
        "blocks": Counter("tokenzoom:kv_blocks_reclaimed_total", "KV blocks given back while their request ran",
                          ["method"]),
        "seconds": Histogram("tokenzoom:policy_seconds", "Time of each tokenzoom policy decision", ["method"],
                             buckets=seconds),
    }


TOTALS_ATTR = "_tokenzoom_figures"  # on vLLM's per-request output state: the request's totals so far


def take_figures(request_states: dict, engine_core_outputs) -> None:
    """Before vLLM's ``OutputProcessor`` makes request outputs: count each output's figures into the
    metrics and the request's totals; a finished request's output carries its totals
    (``request_totals``), any other's loses the figures (they are not the caller's)."""
    from vllm_tokenzoom.v1.core.sched.scheduler import FIGURES_KEY, RESULTS_KEY

    for out in engine_core_outputs:
        params = out.kv_transfer_params or {}
        mine = params.get(RESULTS_KEY) or {}
        if FIGURES_KEY not in mine and out.finish_reason is None:
            continue
        state = request_states.get(out.request_id)  # None: aborted meanwhile (still counted)
        totals = getattr(state, TOTALS_ATTR, None)
        if FIGURES_KEY in mine:
            if totals is None:
                totals = {"rows": 0, "shares": 0.0, "steps": 0, "blocks": 0, "seconds": 0.0}
                if state is not None:
                    setattr(state, TOTALS_ATTR, totals)
            for fig in mine[FIGURES_KEY]:
                _count(fig, totals)
            mine = {k: v for k, v in mine.items() if k != FIGURES_KEY}
        if out.finish_reason is not None and totals is not None:
            mine = {**mine, FIGURES_KEY: request_totals(totals)}
        rest = {k: v for k, v in params.items() if k != RESULTS_KEY}
        out.kv_transfer_params = ({**rest, RESULTS_KEY: mine} if mine else rest) or None


def _count(fig: dict, totals: dict) -> None:
    m = stage_metrics()
    for method, rows in fig["rows_skipped"].items():
        m["rows"].labels(method).inc(rows)
        totals["rows"] += rows
    for share in fig["read_shares"]:
        m["share"].labels(fig["decode"]).observe(share)
    totals["shares"] += sum(fig["read_shares"])
    totals["steps"] += len(fig["read_shares"])
    if fig["blocks_reclaimed"]:
        m["blocks"].labels(fig["decode"]).inc(fig["blocks_reclaimed"])
        totals["blocks"] += fig["blocks_reclaimed"]
    for method, seconds in fig["policy_seconds"]:
        m["seconds"].labels(method).observe(seconds)
        totals["seconds"] += seconds


def request_totals(totals: dict) -> dict:
    """What a finished request's output says of it (README "Metrics")."""
    return {"prefill_visual_rows_skipped": totals["rows"], "decode_steps": totals["steps"],
            "decode_visual_attended_ratio": round(totals["shares"] / totals["steps"], 4) if totals["steps"] else None,
            "kv_blocks_reclaimed": totals["blocks"], "policy_seconds": round(totals["seconds"], 6)}
