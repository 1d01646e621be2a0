"""The opt-in record of what each request's policies decided (tests, benchmarks, debugging, the
token-map pictures): in memory with ``TOKENZOOM_TRACE=1`` (:data:`TRACES`), and with
``TOKENZOOM_TRACE_DIR`` also one JSON file per request, written when its session ends."""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import torch

# the decision log of the most recent requests: req_id -> {policy: [its decisions],
# "visual_kv_share": the layer-averaged share once the prompt is computed}
TRACES: collections.OrderedDict[str, dict] = collections.OrderedDict()
_TRACE_KEEP = 256


def tracing() -> bool:
    return os.environ.get("TOKENZOOM_TRACE") == "1" or bool(os.environ.get("TOKENZOOM_TRACE_DIR"))


def trace_dir() -> str | None:
    """Where each traced request's record goes when it ends (``TOKENZOOM_TRACE_DIR``; the
    token-map pictures, ``python -m vllm_tokenzoom.tokenmap``, read it), and a marker lives while
    its session does (``<request id>.open``)."""
    return os.environ.get("TOKENZOOM_TRACE_DIR") or None


def start_trace(req_id: str, policies) -> None:
    """An empty decision log per policy for a new request; the oldest logs go beyond the last 256."""
    TRACES[req_id] = {name: [] for name in policies}
    while len(TRACES) > _TRACE_KEEP:
        TRACES.popitem(last=False)


def open_marker(req_id: str) -> Path | None:
    """With ``TOKENZOOM_TRACE_DIR``: ``<request id>.open`` exists there while the request's session
    lives (what a soak run counts as sessions left behind); None otherwise."""
    from vllm.distributed import get_tensor_model_parallel_rank

    where = trace_dir()
    return None if where is None or get_tensor_model_parallel_rank() != 0 else Path(where) / f"{req_id}.open"


def mark_open(req_id: str) -> None:
    if (marker := open_marker(req_id)) is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def write_record(session) -> None:
    """With ``TOKENZOOM_TRACE_DIR``: ``<request id>.json`` = ``session.record()``, written whole
    (a reader polling the directory never sees half a record), and the open marker removed."""
    where = trace_dir()
    if where is None:
        return
    from vllm.distributed import get_tensor_model_parallel_rank

    if get_tensor_model_parallel_rank() == 0:  # every rank decides the same: one writes
        path = Path(where) / f"{session.req_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        part.write_text(json.dumps(session.record(), default=_jsonable))
        part.replace(path)
        open_marker(session.req_id).unlink(missing_ok=True)


def _jsonable(x):
    return x.tolist() if isinstance(x, torch.Tensor) else list(x) if isinstance(x, (tuple, set)) else str(x)
