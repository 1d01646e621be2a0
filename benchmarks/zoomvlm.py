"""ZoomVLM (VOA + ATA) against vanilla vLLM, each part alone, and the oracle prompt (issue #12,
"Measure"): time to first token, decode tokens/s and KV blocks held per request over the
decode, at 32 frames, batch 1 (and ``--batch 16``: the decode step when all requests decode).

Each setting runs in its own process on the same machine, one after the other (offline
``LLM``, in-process engine, fp32, eager, caches off, distinct videos, 2 GiB of KV,
``--max-num-batched-tokens 8192``). Per request (``voa_probe.py``): TTFT = from adding it to
its first token; decode tokens/s = (tokens - 1) / (last token - first token) as the caller
sees it, so for VOA it includes the second pass's prefill after token s; ``second_pass_*``:
the same over the tokens after s (VOA only); KV blocks held at each scheduler step (plot).
The oracle prompt is vanilla vLLM with about as many visual tokens as VOA's second pass
(22 x 100 + 10 x 196 = 4160 -> 21 frames). ``ata`` alone uses the tokenizer's sentence ends
(on this random-weight model it rarely fires: its cost is its scoring).

    python benchmarks/zoomvlm.py [--model models/qwen2-0.5b] [--tokens 48] [--frames 32] [--rounds 1]

Appends to benchmarks/results/zoomvlm.csv; writes zoomvlm.{json,png} (``--batch 16``:
zoomvlm_batch16.json; ``--tag T``: a suffix ``_T`` for a partial run's).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ttft_ttm import RESULTS, _version, append_csv, machine  # noqa: E402

from vllm_tokenzoom.testing.offline import run_offline  # noqa: E402

BENCH = Path(__file__).resolve().parent
SETTINGS = {  # name -> (additional_config, plugins loaded, frames: None = --frames)
    "vanilla": ({}, False, None),
    "zoomvlm": ({"tokenzoom": {"preset": "zoomvlm"}}, True, None),
    "voa": ({"tokenzoom": {"methods": {"voa": {}}}}, True, None),
    "ata": ({"tokenzoom": {"methods": {"ata": {}}}}, True, None),
    "oracle (21 frames)": ({}, False, 21),
}


def measure(model: str, name: str, frames: int, tokens: int, seed: int, batch: int = 1) -> dict:
    config, plugins, fixed = SETTINGS[name]
    frames = fixed or frames
    requests = [dict(frames=frames, seed=seed + 1000 * i, max_tokens=tokens) for i in range(batch)]
    voa = name in ("zoomvlm", "voa")
    result = run_offline(model, requests, config, plugins=plugins, warmup=[dict(frames=4, seed=seed - 1, max_tokens=2)],
                         timeout=7200, preload=["voa_probe", "step_probe"], trace=plugins, batch=batch > 1,
                         llm_kwargs={"max_num_batched_tokens": 8192, "max_model_len": 8192, "max_num_seqs": batch},
                         # 16 vanilla 32-frame requests: 16 x 50 blocks of 128 tokens x 24 KB = 2.4 GiB
                         env={"PYTHONPATH": str(BENCH), "VLLM_CPU_KVCACHE_SPACE": "2" if batch == 1 else "5"})
    # ATA's adjustments, summed over the requests (a random-weight model rarely samples a sentence end)
    adjustments = sum(len((o["traces"] or {}).get("ata") or []) for o in result["outputs"]) if plugins else None
    if batch > 1:
        return dict(batch_row(name, frames, tokens, batch, result), ata_adjustments=adjustments)
    (out,) = result["outputs"]
    log = result["reports"]["voa_probe"]
    rid, rec = list(log["requests"].items())[-1]  # the measured request (after the warm-up)
    blocks = log["blocks"].get(rid, [])
    row = dict(setting=name, frames=frames, tokens=len(out["tokens"]), prompt_tokens=out["num_prompt_tokens"],
               ttft_s=round(rec["first"] - rec["added"], 2),
               decode_tokens_per_s=round((len(out["tokens"]) - 1) / (rec["last"] - rec["first"]), 2),
               peak_kv_blocks=max((n for _, n in blocks), default=0), request_s=round(out["seconds"], 2),
               ata_adjustments=adjustments)
    if voa:  # the keyframes, and the decode rate of the second pass (after its prefill)
        row["keyframes"] = (out["traces"] or {}).get("voa")
        s, times = 20, rec["times"]
        row["second_pass_decode_tokens_per_s"] = round((len(times) - s - 1) / (times[-1] - times[s]), 2)
        row["second_pass_ttft_s"] = round(times[s] - times[s - 1], 2)  # token s to token s+1: its prefill
    return dict(row, blocks_series=[n for _, n in blocks])


def batch_row(name: str, frames: int, tokens: int, batch: int, result: dict) -> dict:
    """Batch > 1: the decode step when every request decodes (VOA: its second pass), as the
    median of the last 20 such steps (``step_probe``), and each request's peak KV blocks."""
    full = [sec for n, sec in result["reports"]["step_probe"]["decode_steps"] if n == batch][-20:]
    log = result["reports"]["voa_probe"]
    peaks = [max(n for _, n in series) for rid, series in log["blocks"].items() if rid in log["requests"]][1:]
    step = statistics.median(full) if full else float("nan")
    return dict(setting=name, frames=frames, batch=batch, tokens=tokens, decode_steps_measured=len(full),
                decode_step_ms=round(1000 * step, 1), decode_tokens_per_s=round(batch / step, 2),
                peak_kv_blocks=round(statistics.mean(peaks), 1), blocks_series=[],
                request_s=round(max(o["seconds"] for o in result["outputs"]), 1))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.plot(r["blocks_series"], label=f"{r['setting']} (peak {r['peak_kv_blocks']})")
    ax.set_xlabel("scheduler step (the request's prefill(s), then one step per token)")
    ax.set_ylabel("KV blocks held (128 tokens each)")
    ax.set_title(f"KV held by one {rows[0]['frames']}-frame request over its decode, batch 1", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/qwen2-0.5b")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48, help="tokens per request (ignore_eos): s = 20, then 28")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1, help="requests at once (> 1: decode step when all decode)")
    ap.add_argument("--tag", default="", help="a partial run's JSON and plot get this suffix (zoomvlm_TAG.json), "
                                             "so it does not replace the full run's")
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for i, name in enumerate(args.settings.split(",")):
            print(f"round {round_ + 1}: {name}", flush=True)
            row = measure(args.model, name, args.frames, args.tokens, seed=3000 + 10 * i + 100 * round_,
                          batch=args.batch)
            runs.setdefault(name, []).append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "blocks_series"}), flush=True)
    rows = []
    for name, samples in runs.items():
        row = dict(samples[-1], rounds=len(samples))
        for key in ("ttft_s", "decode_tokens_per_s") if args.batch == 1 else ("decode_tokens_per_s",):
            row[key] = statistics.median(r[key] for r in samples)
            row[key + "_all"] = [r[key] for r in samples]
        rows.append(row)
    base = next(r for r in rows if r["setting"] == "vanilla") if "vanilla" in runs else None
    for r in rows:
        if base and args.batch == 1:
            r["ttft_vs_vanilla"] = round(r["ttft_s"] / base["ttft_s"], 3)
        if base:
            r["decode_vs_vanilla"] = round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
            r["kv_vs_vanilla"] = round(r["peak_kv_blocks"] / base["peak_kv_blocks"], 3)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=machine(), model=args.model, batch=args.batch,
                vllm=_version("vllm"), torch=_version("torch"), mode="offline LLM, in-process engine, eager, fp32")
    append_csv(RESULTS / "zoomvlm.csv", meta, [{k: v for k, v in r.items() if k != "blocks_series"} for r in rows])
    suffix = ("" if args.batch == 1 else f"_batch{args.batch}") + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"zoomvlm{suffix}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    if args.batch == 1:
        plot(rows, RESULTS / f"zoomvlm{suffix}.png")
    print(f"wrote {RESULTS / 'zoomvlm.csv'}")


if __name__ == "__main__":
    main()
