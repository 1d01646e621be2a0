"""TTFT of the in-LLM prefill methods (rows dropped inside the LLM: FastV, VAS) against vanilla
vLLM, TTM, their combinations and the three-stage ``cascade``, with their FLOPs predictions and
oracle prompts (issues #10 and #11, "Measure").

All settings in one run, same machine, each in its own process, one after the other:
offline ``LLM``, in-process engine, fp32, eager, caches off, every request its own video
(distinct seeds), a warm-up request first, median over ``--reps`` requests. TTFT = wall
time of a ``max_tokens=1`` generate call (video preprocessing, vision tower, prefill). The
probe (``prefill_probe.py``) splits the prefill step into the vision path and the LLM
forward, and counts the rows every decoder layer computed. The *FLOPs prediction* of a
setting's LLM time is vanilla's measured LLM time x (the setting's LLM FLOPs / vanilla's),
the FLOPs summed over layers from the measured row counts (a layer of n rows over n keys:
QKV and O projections, causal attention, SwiGLU MLP); its predicted TTFT adds its own
measured vision time and vanilla's remaining overhead. The *layer-averaged visual KV share*
(methods-spec §0) comes from the same row counts. The *oracle prompt* is vanilla vLLM given
as many frames as the setting's layer-averaged visual tokens.

    python benchmarks/ttft_prefill.py [--model models/qwen2-0.5b] [--frames 16,32] [--reps 2]
                                      [--settings vanilla,vas,...] [--quick]

Writes benchmarks/results/ttft_prefill.{csv,json,png} and ttft_prefill_latest.md.
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
PER_FRAME = 196
FASTV = {"fastv": {"layer": 2, "prune_ratio": 0.5}}
TTM = {"ttm": {"prune_ratio": 0.7}}
SETTINGS = {  # name -> tokenzoom config (None: vanilla vLLM, no plugin loaded)
    "vanilla": None,
    "fastv": {"methods": FASTV},
    "vas": {"preset": "vas"},
    "ttm": {"methods": TTM},
    "ttm+fastv": {"methods": {**TTM, **FASTV}},
    "ttm+vas": {"methods": {**TTM, "vas": {}}},
    "cascade": {"preset": "cascade"},
}


def layer_flops(n: int, cfg: dict) -> float:
    """One Qwen2 decoder layer over n rows attending causally to each other (prefill)."""
    d, m = cfg["hidden_size"], cfg["intermediate_size"]
    head = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head
    projections = 2 * n * d * (d + 2 * kv) + 2 * n * d * d
    attention = 2 * n * n * cfg["num_attention_heads"] * head  # QK^T and PV over the causal half
    return projections + attention + 2 * n * 3 * d * m


def run(model: str, name: str, frames: int, reps: int, seed0: int) -> dict:
    config = SETTINGS[name]
    requests = [dict(frames=frames, seed=seed0 + r, max_tokens=1) for r in range(reps)]
    result = run_offline(model, requests, {"tokenzoom": config} if config else {}, plugins=config is not None, warmup=[dict(frames=frames, seed=seed0 - 1, max_tokens=1)],
                         preload=["prefill_probe"], env={"PYTHONPATH": str(BENCH)}, timeout=7200,
                         llm_kwargs={"max_model_len": 8192, "max_num_batched_tokens": 8192})
    prefills = result["reports"]["prefill_probe"]["prefills"][1:]  # the warm-up's first
    assert len(prefills) == reps, prefills
    outs = result["outputs"]
    return dict(ttft_s=statistics.median(o["seconds"] for o in outs),
                vision_s=statistics.median(p["vision_s"] for p in prefills),
                llm_s=statistics.median(p["llm_s"] for p in prefills),
                rows=prefills[0]["rows"], prompt_tokens=outs[0]["num_prompt_tokens"],
                all_ttft_s=[round(o["seconds"], 3) for o in outs])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/qwen2-0.5b")
    ap.add_argument("--frames", default="16,32")
    ap.add_argument("--reps", type=int, default=2, help="timed requests per setting (median reported)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="which settings (vanilla always runs)")
    ap.add_argument("--quick", action="store_true", help="16 frames, one rep")
    ap.add_argument("--rerender", action="store_true",
                    help="rebuild the rows, table and plot from the last run's ttft_prefill.json (no CSV row, no run)")
    args = ap.parse_args(argv)
    if args.rerender:
        return rerender(args.model)
    names = ["vanilla"] + [n for n in args.settings.split(",") if n != "vanilla"]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; allowed: {', '.join(SETTINGS)}")
    if args.quick:
        args.frames, args.reps = "16", 1
    cfg = json.loads((Path(args.model) / "config.json").read_text())["text_config"]
    t0 = time.time()
    runs: dict[tuple[str, int], dict] = {}
    for frames in [int(f) for f in args.frames.split(",")]:
        for name in names:
            print(f"{name}, {frames} frames", flush=True)
            runs[name, frames] = run(args.model, name, frames, args.reps, seed0=2000 + frames)
        for name in names[1:]:  # oracle prompts: as many frames as the layer-averaged visual tokens
            oracle = _oracle_frames(runs[name, frames], runs["vanilla", frames], frames)
            if ("vanilla", oracle) not in runs:
                print(f"oracle: vanilla, {oracle} frames", flush=True)
                runs["vanilla", oracle] = run(args.model, "vanilla", oracle, args.reps, seed0=3000 + oracle)
    frame_counts = {int(f) for f in args.frames.split(",")}
    rows = [_row(name, frames, runs, cfg) for (name, frames) in runs if frames in frame_counts]
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=machine(), model=args.model, reps=args.reps,
                vllm=_version("vllm"), torch=_version("torch"), dtype="float32",
                mode="offline LLM, in-process engine, eager, caches off", wall_s=round(time.time() - t0))
    save(rows, runs, meta)


def _oracle_frames(setting: dict, vanilla: dict, frames: int) -> int:
    text = vanilla["prompt_tokens"] - frames * PER_FRAME - 1
    share = sum(r - text - 1 for r in setting["rows"]) / (len(setting["rows"]) * frames * PER_FRAME)
    return max(1, round(frames * share))


def _row(name: str, frames: int, runs: dict, cfg: dict) -> dict:
    r, v = runs[name, frames], runs["vanilla", frames]
    flops = sum(layer_flops(n, cfg) for n in r["rows"]) / sum(layer_flops(n, cfg) for n in v["rows"])
    predicted_llm = v["llm_s"] * flops
    overhead = v["ttft_s"] - v["vision_s"] - v["llm_s"]
    predicted_ttft = r["vision_s"] + predicted_llm + overhead
    text = v["prompt_tokens"] - frames * PER_FRAME - 1
    share = sum(n - text - 1 for n in r["rows"]) / (len(r["rows"]) * frames * PER_FRAME)
    row = dict(setting=name, frames=frames, prompt_tokens=r["prompt_tokens"], rows_first=r["rows"][0],
               rows_last=r["rows"][-1], visual_kv_share=round(share, 4), ttft_s=round(r["ttft_s"], 3),
               vision_s=round(r["vision_s"], 3), llm_s=round(r["llm_s"], 3),
               ttft_over_vanilla=round(r["ttft_s"] / v["ttft_s"], 3), llm_over_vanilla=round(r["llm_s"] / v["llm_s"], 3),
               llm_flops_over_vanilla=round(flops, 3), llm_over_prediction=round(r["llm_s"] / predicted_llm, 3),
               predicted_ttft_s=round(predicted_ttft, 3), all_ttft_s=r["all_ttft_s"])
    if name != "vanilla":
        oracle = _oracle_frames(r, v, frames)
        if ("vanilla", oracle) in runs:
            o = runs["vanilla", oracle]
            # the oracle also runs the vision tower on fewer frames: the LLM's share of the gap apart
            row.update(oracle_frames=oracle, oracle_ttft_s=round(o["ttft_s"], 3),
                       ttft_over_oracle=round(r["ttft_s"] / o["ttft_s"], 3), oracle_vision_s=round(o["vision_s"], 3),
                       llm_over_oracle=round(r["llm_s"] / o["llm_s"], 3))
    return row


def rerender(model: str) -> None:
    saved = json.loads((RESULTS / "ttft_prefill.json").read_text())
    runs = {(k.rsplit(" ", 1)[0], int(k.rsplit(" ", 1)[1])): r for k, r in saved["runs"].items()}
    cfg = json.loads((Path(saved["meta"]["model"]) / "config.json").read_text())["text_config"]
    frame_counts = {r["frames"] for r in saved["rows"]}
    rows = [_row(name, frames, runs, cfg) for (name, frames) in runs if frames in frame_counts]
    save(rows, runs, saved["meta"], csv=False)


def save(rows, runs, meta, csv: bool = True) -> None:
    RESULTS.mkdir(exist_ok=True)
    if csv:
        append_csv(RESULTS / "ttft_prefill.csv", meta, [{k: v for k, v in r.items() if k != "all_ttft_s"} for r in rows])
    (RESULTS / "ttft_prefill.json").write_text(json.dumps(
        dict(meta=meta, rows=rows, runs={f"{n} {f}": r for (n, f), r in runs.items()}), indent=1) + "\n")
    cols = ["setting", "frames", "visual_kv_share", "ttft_s", "vision_s", "llm_s", "ttft_over_vanilla",
            "llm_over_vanilla", "llm_flops_over_vanilla", "llm_over_prediction", "predicted_ttft_s", "oracle_frames",
            "ttft_over_oracle", "oracle_vision_s", "llm_over_oracle"]
    lines = [f"TTFT, {meta['model']}, {meta['machine']}, {meta['date']}, median of {meta['reps']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    (RESULTS / "ttft_prefill_latest.md").write_text("\n".join(lines) + "\n")
    plot(rows, meta, RESULTS / "ttft_prefill.png")
    print("\n".join(lines))


def plot(rows, meta, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = sorted({r["frames"] for r in rows})
    fig, axes = plt.subplots(1, len(frames), figsize=(5 * len(frames), 4), squeeze=False)
    for ax, f in zip(axes[0], frames):
        mine = [r for r in rows if r["frames"] == f]
        names = [r["setting"] for r in mine]
        ax.bar(names, [r["vision_s"] for r in mine], label="vision path", color="C7")
        ax.bar(names, [r["llm_s"] for r in mine], bottom=[r["vision_s"] for r in mine], label="LLM (measured)",
               color="C0")
        ax.scatter(names, [r["predicted_ttft_s"] for r in mine], color="C3", zorder=3, label="FLOPs-predicted TTFT")
        ax.scatter(names, [r["ttft_s"] for r in mine], marker="_", s=400, color="k", zorder=3, label="TTFT")
        ax.set_title(f"{f} frames", fontsize=9)
        ax.set_ylabel("seconds")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"TTFT, {Path(meta['model']).name}, fp32, {meta['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
