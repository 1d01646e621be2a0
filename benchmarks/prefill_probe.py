"""Prefill-time probe for benchmarks/ttft_prefill.py, imported by the offline child before its
engine starts (``run_offline(..., preload=["prefill_probe"])``; the model runs in that process).

Times, per engine step, the runner's multimodal encoder (``_execute_mm_encoder``: vision
tower, projector, pooling and the pre-LLM policy) and its model forward (``_model_forward``:
every decoder layer and the final norm, tokenzoom's hooks included), the same for vanilla
vLLM and tokenzoom; and counts the rows each decoder layer computed. On CPU every op is
synchronous, so wall time is compute time. ``report()``: one entry per forward with more
than one row (a prefill): its LLM seconds, rows per layer, and the vision seconds spent in
the same engine step.
"""
import time

from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

_PREFILLS: list[dict] = []
_pending = {"vision_s": 0.0, "rows": []}
_embed, _forward, _layer = GPUModelRunner._execute_mm_encoder, GPUModelRunner._model_forward, Qwen2DecoderLayer.forward


def embed_multimodal(self, *args, **kwargs):
    t0 = time.perf_counter()
    out = _embed(self, *args, **kwargs)
    _pending["vision_s"] += time.perf_counter() - t0
    return out


def forward(self, *args, **kwargs):
    _pending["rows"] = []
    t0 = time.perf_counter()
    out = _forward(self, *args, **kwargs)
    seconds = time.perf_counter() - t0
    if max(_pending["rows"], default=0) > 1:
        _PREFILLS.append(dict(llm_s=seconds, vision_s=_pending["vision_s"], rows=list(_pending["rows"])))
    _pending["vision_s"] = 0.0
    return out


def layer_forward(self, positions, hidden_states, residual):
    _pending["rows"].append(hidden_states.shape[0])
    return _layer(self, positions, hidden_states, residual)


GPUModelRunner._execute_mm_encoder = embed_multimodal
GPUModelRunner._model_forward = forward
Qwen2DecoderLayer.forward = layer_forward


def report():
    return {"prefills": _PREFILLS}
