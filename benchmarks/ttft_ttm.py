"""TTFT of TTM against vanilla vLLM and the oracle prompt (issue: walking skeleton, "Measure").

For each K, tokenzoom's TTM on a 16-frame video is compared, in the same run on the same
machine, with
- vanilla vLLM on the same 16-frame video, and
- the *oracle prompt*: vanilla vLLM given a video with proportionally fewer frames, i.e.
  about the same number of visual tokens as TTM keeps. Oracle TTFT at TTM's exact token
  count is interpolated linearly between the two nearest frame counts.
Every request has its own video (distinct seeds) and prefix / multimodal caching is off,
so nothing is served from a cache. TTFT = wall time of a ``max_tokens=1`` generate call,
which includes video preprocessing, the vision tower and prefill; the median over
``--reps`` requests after a warm-up request is reported.

    python benchmarks/ttft_ttm.py [--model models/qwen2-0.5b] [--reps 3] [--quick]

Writes benchmarks/results/ttft_ttm.csv (rows appended), ttft_ttm.json and ttft_ttm.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import time
from pathlib import Path

from vllm_tokenzoom.methods.ttm import TTM
from vllm_tokenzoom.testing.offline import run_offline

RESULTS = Path(__file__).resolve().parent / "results"
PER_FRAME = 196


def isa() -> str:
    """The vector ISA vLLM's CPU path and tokenzoom's C++ kernel run on here: timings differ
    4-8x between the two, so every results row names it."""
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return "avx512" if "avx512f" in flags.split() else "avx2"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import os

    return f"{os.cpu_count()} x {cpu}, {platform.system()}, {isa()}"


def timed(model, frames_list, reps, seed0, additional_config=None, plugins=True):
    """Median TTFT per frame count, every request with a distinct video."""
    requests = [dict(frames=f, seed=seed0 + 100 * i + r, max_tokens=1)
                for i, f in enumerate(frames_list) for r in range(reps)]
    result = run_offline(model, requests, additional_config, plugins=plugins,
                         warmup=[dict(frames=frames_list[0], seed=seed0 - 1, max_tokens=1)], timeout=3600)
    out = {}
    for i, f in enumerate(frames_list):
        rows = result["outputs"][i * reps:(i + 1) * reps]
        out[f] = dict(ttft_s=statistics.median(r["seconds"] for r in rows),
                      all_s=[round(r["seconds"], 3) for r in rows],
                      prompt_tokens=rows[0]["num_prompt_tokens"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/qwen2-0.5b", help="checkpoint (make it with tiny_model --preset qwen2-0.5b)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--ratios", default="0.3,0.5,0.7", help="TTM prune ratios K")
    ap.add_argument("--reps", type=int, default=3, help="timed requests per setting (median reported)")
    ap.add_argument("--quick", action="store_true", help="one rep, K=0.7 only")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.ratios = 1, "0.7"
    ratios = [float(k) for k in args.ratios.split(",")]

    kept = {k: TTM(prune_ratio=k).num_kept_tokens(args.frames, PER_FRAME) for k in ratios}
    oracle_frames = sorted({f for k in ratios for f in (math.floor(kept[k] / PER_FRAME), math.ceil(kept[k] / PER_FRAME))})
    t0 = time.time()
    print(f"vanilla: {args.frames} frames and oracle frame counts {oracle_frames}", flush=True)
    vanilla = timed(args.model, [args.frames, *oracle_frames], args.reps, seed0=1000, plugins=False)
    rows = []
    for k in ratios:
        print(f"TTM K={k}", flush=True)
        config = {"tokenzoom": {"methods": {"ttm": {"prune_ratio": k}}}}
        ttm = timed(args.model, [args.frames], args.reps, seed0=1000, additional_config=config)[args.frames]
        lo, hi = math.floor(kept[k] / PER_FRAME), math.ceil(kept[k] / PER_FRAME)
        frac = (kept[k] / PER_FRAME - lo) if hi > lo else 0.0
        oracle = vanilla[lo]["ttft_s"] + frac * (vanilla[hi]["ttft_s"] - vanilla[lo]["ttft_s"])
        rows.append(dict(
            K=k, frames=args.frames, visual_tokens_vanilla=args.frames * PER_FRAME + 1, visual_tokens_ttm=kept[k] + 1,
            ttft_vanilla_s=round(vanilla[args.frames]["ttft_s"], 3), ttft_ttm_s=round(ttm["ttft_s"], 3),
            ttft_oracle_s=round(oracle, 3), oracle_frames=f"{lo}-{hi}" if hi > lo else str(lo),
            ttm_over_vanilla=round(ttm["ttft_s"] / vanilla[args.frames]["ttft_s"], 3),
            ttm_over_oracle=round(ttm["ttft_s"] / oracle, 3), ttm_all_s=ttm["all_s"],
        ))
        print(json.dumps(rows[-1]), flush=True)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=machine(), model=args.model, reps=args.reps,
                vllm=_version("vllm"), torch=_version("torch"), dtype="float32", mode="offline LLM, in-process engine, eager",
                wall_s=round(time.time() - t0))
    save(rows, vanilla, meta)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def append_csv(path: Path, meta: dict, rows: list[dict], defaults: dict | None = None) -> None:
    """Append rows (meta columns first) to a results CSV. When they bring columns the file
    lacks, the file is rewritten with the union of columns, its earlier rows taking
    ``defaults`` (else empty) in the new ones, so no row ever sits under another's header."""
    new = [{**meta, **r} for r in rows]
    old = list(csv.DictReader(path.open())) if path.exists() else []
    header = next(csv.reader(path.open()), []) if path.exists() else []
    fields = list(dict.fromkeys([*header, *(k for r in new for k in r)]))
    with open(path, "a" if fields == header else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if fields != header:
            w.writeheader()
            w.writerows({**(defaults or {}), **r} for r in old)
        w.writerows(new)


def save(rows, vanilla, meta) -> None:
    RESULTS.mkdir(exist_ok=True)
    csv_path = RESULTS / "ttft_ttm.csv"
    fields = ["date", "machine", "model", "reps", *rows[0].keys(), "vllm", "torch"]
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({**meta, **row})
    (RESULTS / "ttft_ttm.json").write_text(json.dumps(dict(meta=meta, rows=rows, vanilla=vanilla), indent=1) + "\n")
    plot(rows, vanilla, meta, RESULTS / "ttft_ttm.png")
    print(f"wrote {csv_path}, ttft_ttm.json, ttft_ttm.png")


def plot(rows, vanilla, meta, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    frames = sorted(vanilla)
    ax.plot([vanilla[f]["prompt_tokens"] for f in frames], [vanilla[f]["ttft_s"] for f in frames], "o-",
            color="grey", label="vanilla vLLM (fewer frames = oracle prompt)")
    ax.scatter([r["visual_tokens_ttm"] for r in rows], [r["ttft_ttm_s"] for r in rows], color="C1", zorder=3,
               label="tokenzoom TTM, 16 frames")
    for r in rows:
        ax.annotate(f"K={r['K']}", (r["visual_tokens_ttm"], r["ttft_ttm_s"]), textcoords="offset points", xytext=(5, -12))
    ax.set_xlabel("prompt tokens (vanilla) / visual tokens kept (TTM)")
    ax.set_ylabel("TTFT (s, median)")
    ax.set_title(f"TTFT, {Path(meta['model']).name}, fp32\n{meta['machine']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
