"""Soak a live ``vllm serve --plugin tokenzoom``: many mixed requests through a bounded client.

Every request is a video chat (or, some, text only) with a per-request method, streamed or not;
a share of them is cancelled by the client mid-flight (the stream closed after a chunk or two).
``--methods every`` (the default; needs a model of 12 layers, e.g. the tiny-deep one) mixes the
server's default ``dycoke`` with ``ttm`` at two ratios, ``dp``, ``fastv``, ``ata``, ``vas``,
``cascade`` and ``zoomvlm`` (two passes); ``--methods base`` the first six (any model, as CI's
short run). First each distinct request is sent alone; then a burst of ``--burst`` at once; then
``--requests`` through ``--concurrency`` workers. Every reply that completes must equal its
request sent alone (greedy, fp32). Afterwards: vLLM's KV usage back to 0, no tokenzoom session
alive (the worker's ``TOKENZOOM_TRACE_DIR`` markers), no traceback in the server log. Writes a
JSON report.

    .venv/bin/python -m vllm_tokenzoom.testing.tiny_model --out models/tiny-deep --preset tiny-deep
    .venv/bin/python benchmarks/soak.py --model models/tiny-deep --requests 1000 \\
        --out benchmarks/results/soak.json
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVER_CONFIG = {"tokenzoom": {"preset": "dycoke", "per_request": ["ttm", "dp", "fastv", "ata"]}}
BASE = {  # name -> the request's tokenzoom setting (None: the server's default)
    "dycoke": None,
    "ttm": {"preset": "ttm"},
    "ttm-0.5": {"methods": {"ttm": {"prune_ratio": 0.5}}},
    "dp": {"methods": {"dp": {}}},
    "fastv": {"methods": {"fastv": {}}},
    "ata": {"methods": {"ata": {"first_score_layer": 1, "last_score_layer": 3, "every": 1, "copies": 8, "drops": 8}}},
}
# every method: VOA's settings small enough that both passes run within --max-tokens 16
EVERY_SERVER_CONFIG = {"tokenzoom": {"preset": "dycoke",
                                     "per_request": ["ttm", "dp", "fastv", "ata", "vas", "voa"]}}
EVERY = {**BASE, "vas": {"preset": "vas"}, "cascade": {"preset": "cascade"},
         "zoomvlm": {"methods": {"voa": {"keyframes": 4, "probe_tokens": 6},
                                 "ata": {"every": 1, "copies": 8, "drops": 8}}}}
SETS = {"base": (SERVER_CONFIG, BASE), "every": (EVERY_SERVER_CONFIG, EVERY)}
QUESTION = "What happens in this video?"


def kv_usage(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return max([float(v) for v in re.findall(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)$", text, re.M)] or [0.0])


class Soak:
    def __init__(self, url: str, videos: list[Path], max_tokens: int, seed: int, settings: dict = BASE):
        self.url, self.videos, self.max_tokens, self.settings = url, videos, max_tokens, settings
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=900)
        self.model = self.client.models.list().data[0].id
        self.rng = random.Random(seed)
        self.alone: dict[tuple, str] = {}
        self.errors: Counter[str] = Counter()
        self.mismatches: list[tuple] = []
        self.counts: Counter[str] = Counter()
        self.peak_kv = 0.0

    def keys(self) -> list[tuple]:
        """Every distinct request: (video index or None for text only, setting name)."""
        return [(v, s) for v in range(len(self.videos)) for s in self.settings] + [(None, "dycoke")]

    def send(self, key: tuple, stream: bool, cancel_after: int | None = None) -> str | None:
        """The reply's text (None: cancelled)."""
        video, setting = key
        content = ([{"type": "video_url", "video_url": {"url": f"file://{self.videos[video]}"}}] if video is not None
                   else []) + [{"type": "text", "text": QUESTION}]
        chosen = self.settings[setting]
        extra = {} if chosen is None else {"vllm_xargs": {"tokenzoom": json.dumps(chosen)}}
        kwargs = dict(model=self.model, temperature=0.0, max_tokens=self.max_tokens, extra_body=extra,
                      messages=[{"role": "user", "content": content}])
        if not stream:
            return self.client.chat.completions.create(**kwargs).choices[0].message.content
        chunks = self.client.chat.completions.create(stream=True, **kwargs)
        text = []
        for i, chunk in enumerate(chunks):
            if cancel_after is not None and i >= cancel_after:
                chunks.close()  # the client goes away: vLLM aborts the request
                return None
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
        return "".join(text)

    def one(self, key: tuple, stream: bool, cancel_after: int | None) -> None:
        try:
            text = self.send(key, stream, cancel_after)
        except Exception as e:  # counted by kind; the report says which
            self.errors[f"{type(e).__name__}: {str(e)[:120]}"] += 1
            return
        if text is None:
            self.counts["cancelled"] += 1
            return
        self.counts["completed"] += 1
        if text != self.alone[key]:
            self.mismatches.append((key, stream, text[:80], self.alone[key][:80]))

    def watch_kv(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.peak_kv = max(self.peak_kv, kv_usage(self.url))
            except OSError:
                pass
            stop.wait(0.5)

    def run(self, requests: int, concurrency: int, cancel: float, burst: int) -> dict:
        t0 = time.perf_counter()
        for key in self.keys():
            self.alone[key] = self.send(key, stream=False)
        stop = threading.Event()
        watcher = threading.Thread(target=self.watch_kv, args=(stop,), daemon=True)
        watcher.start()
        keys = self.keys()
        plan = [(self.rng.choice(keys), self.rng.random() < 0.5) for _ in range(burst)]
        with ThreadPoolExecutor(burst) as pool:  # the burst: all at once, none cancelled
            list(pool.map(lambda p: self.one(p[0], p[1], None), plan))
        burst_mismatches = len(self.mismatches)
        plan = []
        for _ in range(requests):
            cancelled = self.rng.random() < cancel
            plan.append((self.rng.choice(keys), cancelled or self.rng.random() < 0.5,
                         self.rng.randint(0, 3) if cancelled else None))
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda p: self.one(*p), plan))
        stop.set()
        watcher.join()
        return {"requests": requests, "burst": burst, "concurrency": concurrency, "cancel_share": cancel,
                "distinct_requests": len(keys), "completed": self.counts["completed"],
                "cancelled": self.counts["cancelled"], "errors_by_kind": dict(self.errors),
                "mismatches": len(self.mismatches), "burst_mismatches": burst_mismatches,
                "mismatch_examples": self.mismatches[:5], "duration_s": round(time.perf_counter() - t0, 1),
                "peak_kv_usage": round(self.peak_kv, 4)}


def after(url: str, records: Path, log: Path | None) -> dict:
    """What was left behind once the server is idle."""
    deadline = time.time() + 60
    usage = kv_usage(url)
    while usage > 0 and time.time() < deadline:
        time.sleep(0.5)
        usage = kv_usage(url)
    openai.OpenAI(base_url=url + "/v1", api_key="EMPTY").models.list()  # one more scheduler pass
    time.sleep(1.0)
    text = log.read_text() if log is not None else ""
    return {"final_kv_usage": usage, "sessions_alive": len(list(records.glob("*.open"))),
            "sessions_released": len(list(records.glob("*.json"))), "tracebacks_in_log": text.count("Traceback")}


def videos_in(folder: Path, count: int) -> list[Path]:
    from vllm_tokenzoom.testing.video import make_video, write_mp4

    return [write_mp4(make_video(16, seed=80 + i), folder / f"soak{i}.mp4") for i in range(count)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/tiny-deep")
    ap.add_argument("--methods", choices=sorted(SETS), default="every")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--cancel", type=float, default=0.2)
    ap.add_argument("--videos", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/soak.json")
    args = ap.parse_args(argv)
    from vllm_tokenzoom.testing.server import cpu_serve_args, vllm_server

    work = Path(tempfile.mkdtemp(prefix="tz-soak-"))
    records = work / "records"
    videos = videos_in(work, args.videos)
    server_config, settings = SETS[args.methods]
    serve = cpu_serve_args(args.model, num_frames=16, media_dir=str(work)) + ["--max-num-batched-tokens", "8192"]
    serve += ["--plugin", "tokenzoom", "--additional-config", json.dumps(server_config)]
    with vllm_server(serve, env={"TOKENZOOM_TRACE_DIR": str(records)}) as (url, log):
        report = Soak(url, videos, args.max_tokens, args.seed, settings).run(args.requests, args.concurrency,
                                                                              args.cancel, args.burst)
        report.update(after(url, records, log))
    report.update(model=args.model, server_config=server_config, settings=settings, max_tokens=args.max_tokens,
                  machine=machine(), avx512=_avx512(),
                  date=time.strftime("%Y-%m-%d"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


def machine() -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ttft_ttm import machine as described

    return described()


def _avx512() -> bool:
    from vllm_tokenzoom.ops import cpu_flags

    return {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags()


if __name__ == "__main__":
    main()
