"""Run LLaVA-OneVision video requests through vLLM's offline ``LLM`` in a child process.

Tests and benchmarks need vanilla vLLM and tokenzoom side by side, and a process can
load general plugins only once; each run therefore gets its own process:

    result = run_offline(model_dir, requests=[{"frames": 16, "seed": 0}], additional_config={...})

Child side (``python -m vllm_tokenzoom.testing.offline`` with a JSON job on stdin): one
``LLM`` in fp32, eager, in-process engine; requests run one at a time, so each kept-token
trace (``TokenZoomLlavaOnevision.tokenzoom_trace``) and, with ``trace=True``, each in-LLM
method's decision log (``v1/worker/records.TRACES``) belongs to its request.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from typing import Any

ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # one process: 4 s to load instead of 30+
    "OMP_NUM_THREADS": "2",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


def run_offline(model_dir: str, requests: list[dict[str, Any]], additional_config: dict | None = None,
                plugins: bool = True, llm_kwargs: dict | None = None, warmup: list[dict[str, Any]] = (),
                batch: bool | int = False, env: dict[str, str] | None = None, preload: list[str] = (),
                timeout: float = 600, trace: bool = False, idle_sessions: bool = False) -> dict[str, Any]:
    """Each request: ``frames`` (0: a text-only prompt), ``seed`` (a synthetic video),
    ``video_file`` or ``videoqa_clip`` (a clip seed of ``testing.videoqa``); ``max_tokens``;
    ``question``; ``stop_at_eos``; ``tokenzoom`` (the request's own setting: ``extra_args``);
    ``raw_engine`` (the prompt dict straight to ``LLMEngine.add_request``). ``plugins=False`` runs vanilla vLLM (no
    general plugins loaded at all). ``warmup`` requests run first and are not reported.
    ``batch=True`` sends all requests in one ``generate`` call (no per-request kept tokens; the
    in-LLM traces are per request, the last 256 requests' are kept);
    ``batch=N`` sends them N at a time (each video's pixels are held until it is encoded).
    ``env``: extra environment of the child (e.g. ``TOKENZOOM_KERNELS``). ``preload``: modules
    the child imports before it builds the engine (test hooks; the engine runs in the
    child's own process); a module's ``report()`` result comes back under ``reports``.
    ``trace``: each result carries ``traces`` (method -> decisions) and ``dp_trace``.
    ``idle_sessions``: after the last request, the engine left idle for a second, the worker's
    live tokenzoom sessions come back as ``idle_sessions`` (with multiprocessing, set
    ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` and ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` in ``env``)."""
    job = dict(model=model_dir, requests=requests, additional_config=additional_config or {},
               llm_kwargs=llm_kwargs or {}, warmup=list(warmup), batch=batch, preload=list(preload),
               idle_sessions=idle_sessions)
    env = {**os.environ, **ENV, **({"TOKENZOOM_TRACE": "1"} if trace else {}), **(env or {})}
    if not plugins:
        env["VLLM_PLUGINS"] = "none"  # an allow-list naming no installed plugin
    proc = subprocess.run([sys.executable, "-m", "vllm_tokenzoom.testing.offline"], input=json.dumps(job),
                          capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"offline run failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")


@functools.lru_cache(maxsize=16)
def _videoqa_frames(seed: int):
    from vllm_tokenzoom.testing.videoqa import make_clip

    return make_clip(seed).frames


def load_video(request: dict[str, Any]):
    from vllm_tokenzoom.testing.video import make_video, read_video

    if "video_file" in request:
        return read_video(request["video_file"])
    if "videoqa_clip" in request:
        return _videoqa_frames(request["videoqa_clip"])  # a clip's questions come in a row
    return make_video(request["frames"], seed=request.get("seed", 0))


def _child() -> None:
    job = json.loads(sys.stdin.read())
    import importlib

    hooks = [importlib.import_module(name) for name in job["preload"]]
    from vllm import LLM, SamplingParams

    from vllm_tokenzoom.testing.video import chat_prompt, text_prompt

    kwargs = dict(model=job["model"], dtype="float32", max_model_len=8192, enforce_eager=True, seed=0,
                  limit_mm_per_prompt={"image": 0, "video": 1}, enable_prefix_caching=False,
                  mm_processor_cache_gb=0, additional_config=job["additional_config"],
                  disable_log_stats=False)  # fills RequestOutput.metrics
    kwargs.update(job["llm_kwargs"])
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - t0
    # the readers by their module's name, not __main__'s: the engine core may unpickle them
    from vllm_tokenzoom.testing import offline as readers

    traced = readers._has_trace(llm)

    def prompt_of(req):
        question = req.get("question", "Describe what happens in this video.")
        if req.get("frames", 1) == 0 and "video_file" not in req:
            return {"prompt": text_prompt(llm.get_tokenizer(), question)}
        return {"prompt": chat_prompt(llm.get_tokenizer(), question), "multi_modal_data": {"video": load_video(req)}}

    def params_of(req):
        own = {"extra_args": {"tokenzoom": req["tokenzoom"]}} if "tokenzoom" in req else {}
        return SamplingParams(temperature=0.0, max_tokens=req.get("max_tokens", 8),
                              ignore_eos=not req.get("stop_at_eos", False), **own)

    def result(out, seconds, alone: bool):
        return dict(tokens=list(out.outputs[0].token_ids), text=out.outputs[0].text,
                    figures=((out.kv_transfer_params or {}).get("tokenzoom") or {}).get("figures"),
                    num_prompt_tokens=len(out.prompt_token_ids), seconds=seconds,
                    engine_ttft=getattr(out.metrics, "first_token_latency", None),
                    num_preemptions=getattr(out.metrics, "num_preemptions", None),
                    decode_s=_decode_seconds(out),
                    kept=readers._last_kept(llm) if traced and alone else None,
                    **readers._traces(llm, out.request_id))

    def run(req):
        prompt = prompt_of(req)
        t0 = time.perf_counter()
        if req.get("raw_engine"):  # the prompt dict straight to LLMEngine.add_request (vLLM renders it)
            out = _engine_generate(llm.llm_engine, prompt, params_of(req))
        else:
            (out,) = llm.generate([prompt], params_of(req), use_tqdm=False)
        return result(out, time.perf_counter() - t0, alone=True)

    for req in job["warmup"]:
        run(req)
    if job["batch"]:
        reqs = job["requests"]
        size = len(reqs) if job["batch"] is True else int(job["batch"])
        outputs = []
        for i in range(0, len(reqs), size):
            chunk = reqs[i:i + size]
            prompts = [prompt_of(r) for r in chunk]
            t0 = time.perf_counter()
            outs = llm.generate(prompts, [params_of(r) for r in chunk], use_tqdm=False)
            outputs += [result(o, time.perf_counter() - t0, alone=False) for o in outs]
    else:
        outputs = [run(req) for req in job["requests"]]
    if os.environ.get("TOKENZOOM_TRACE_DIR"):
        from vllm_tokenzoom.tokenmap import write_records

        write_records(llm)
    reports = {h.__name__: h.report() for h in hooks if hasattr(h, "report")}
    extra = {}
    if job["idle_sessions"]:
        time.sleep(1.0)
        extra["idle_sessions"] = llm.apply_model(readers._live_sessions)[0]
    print("RESULT " + json.dumps(dict(load_s=load_s, outputs=outputs, reports=reports, **extra)), flush=True)


def _engine_generate(engine, prompt: dict, params):
    """One request through ``LLMEngine.add_request`` and ``step`` (no ``LLM`` rendering)."""
    import uuid

    engine.add_request(f"raw-{uuid.uuid4().hex[:8]}", prompt, params)
    done = None
    while engine.has_unfinished_requests():
        done = next((o for o in engine.step() if o.finished), done)
    return done


def _live_sessions(model) -> int:
    from vllm_tokenzoom.v1.worker.sessions import SESSIONS

    return len(SESSIONS)


def _decode_seconds(out) -> float | None:
    """Engine time from the first to the last generated token (None without stats)."""
    m = out.metrics
    first, last = getattr(m, "first_token_ts", 0.0), getattr(m, "last_token_ts", 0.0)
    return last - first if first and last else None


# What the child reads from the worker's model (module-level functions: with the engine core
# in its own process, ``apply_model`` pickles them)
def _has_trace(llm) -> bool:
    return llm.apply_model(_tokenzoom_enabled)[0]


def _tokenzoom_enabled(model) -> bool:
    return getattr(model, "tokenzoom", None) is not None  # every video's kept tokens are recorded


def _traces(llm, request_id: str) -> dict:
    """The in-LLM methods' decisions for a finished request (``TOKENZOOM_TRACE=1``)."""
    if os.environ.get("TOKENZOOM_TRACE") != "1":
        return dict(traces=None, dp_trace=None)
    traces = llm.apply_model(functools.partial(_trace_of, request_id))[0]
    return dict(traces=traces, dp_trace=None if traces is None else traces.get("dp"))


def _trace_of(request_id: str, model):
    from vllm_tokenzoom.v1.worker.records import TRACES

    # vLLM's engine appends a random suffix to the request id the LLM gave (``input_processor.py``);
    # a request run in two passes (VOA) has a session, so a trace, per pass: merged, in order
    found = [t for rid, t in TRACES.items() if rid == request_id or rid.startswith(request_id + "-")]
    return {k: v for t in found for k, v in t.items()} if found else None


def _last_kept(llm) -> list[int]:
    return llm.apply_model(_kept_source)[0]


def _kept_source(model) -> list[int] | None:
    return model.tokenzoom_trace[-1].source.tolist() if model.tokenzoom_trace else None


if __name__ == "__main__":
    _child()
