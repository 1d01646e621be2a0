"""Offline speed and memory of vanilla vLLM, tokenzoom's methods and their oracle prompts
(issue #4, "Speed and memory benchmarks").

Settings, all in one run on the same machine, each in its own process (general plugins load
once per process): ``vanilla``; ``ttm`` and ``dycoke`` (tokenzoom presets); ``oracle-ttm`` and
``oracle-dycoke``: vanilla vLLM given a video of proportionally fewer frames, about as many
visual tokens as the method attends to (TTM K=0.7 keeps 1480 of 3136 at 16 frames -> 8
frames; DyCoke attends to those 1480 in its first L layers and int(1480*(1-P)) in the others,
averaged over the model's layers: ~573 -> 3 frames on the 24-layer 0.5B shape).
Offline ``LLM``, in-process engine, fp32, eager; synthetic videos, every request its own;
prefix and multimodal caches off. Per setting:

- lone requests (``--reps``, median): TTFT = wall time of the request minus its decode time
  (video preprocessing, vision tower and prefill included); decode tokens/s = (tokens - 1) /
  engine time from the first to the last token; peak KV blocks per request, *measured*: the
  most blocks the scheduler's block table gave the request at any step (``kv_probe.py``).
- a batch of ``--batch`` requests in one ``generate`` call at a fixed KV budget of
  ``--kv-blocks`` blocks (vLLM's ``num_gpu_blocks_override``): throughput (requests/s, output
  tokens/s; wall time of the whole batch), and the maximum number of concurrent requests at
  that budget, *measured* (most requests past their prefill at once, from the scheduler) and
  *computed* (usable blocks // peak blocks per request), with the scheduler's preemptions.
  ``dycoke`` saves attention reads, not memory (its pruned tokens stay cached): its KV numbers
  equal TTM's, and oracle-dycoke's memory is not a target for it.

    python benchmarks/speed.py [--model models/qwen2-0.5b] [--quick]

Appends rows to benchmarks/results/speed.csv; writes speed.json, speed.png and speed_latest.md
(a markdown table for the README).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from ttft_ttm import PER_FRAME, RESULTS, _version, append_csv, machine  # noqa: E402

from vllm_tokenzoom.testing.offline import ENV, run_offline  # noqa: E402

NAMES = ("vanilla", "ttm", "dycoke", "cascade", "oracle-ttm", "oracle-dycoke")
PRESET = {"ttm": "ttm", "dycoke": "dycoke", "cascade": "cascade"}


def settings(model: str, frames: int) -> dict[str, dict]:
    """name -> additional_config, plugins (False: vanilla vLLM, no plugin loaded), frames."""
    from vllm_tokenzoom.config import parse_config
    from vllm_tokenzoom.engine import enable_in

    methods = parse_config(enable_in({"tokenzoom": {"preset": "dycoke"}})).methods
    ttm, dp = methods["ttm"], methods["dp"]
    kept = ttm.num_kept_tokens(frames, PER_FRAME)
    layers = json.loads((Path(model) / "config.json").read_text())["text_config"]["num_hidden_layers"]
    attended = dp.mean_attended(kept, layers)
    out = {name: dict(config={"tokenzoom": {"preset": preset}}, plugins=True, frames=frames)
           for name, preset in PRESET.items() if preset_fits(preset, layers)}
    out["vanilla"] = dict(config={}, plugins=False, frames=frames)
    for name, tokens in (("oracle-ttm", kept), ("oracle-dycoke", attended)):
        out[name] = dict(config={}, plugins=False, frames=max(1, round(tokens / PER_FRAME)))
    return {name: out[name] for name in NAMES if name in out}


def preset_fits(preset: str, layers: int) -> bool:
    """Whether a preset's settings fit a model of ``layers`` layers (VAS's defaults need >= 9)."""
    from vllm_tokenzoom.config import parse_config
    from vllm_tokenzoom.errors import TokenZoomConfigError

    try:
        parse_config({"tokenzoom": {"preset": preset}}).for_model(layers)
    except TokenZoomConfigError as e:
        print(f"skipping {preset!r} on this model: {e}", flush=True)
        return False
    return True


def _offline(args, setting, requests, **kwargs):
    """run_offline with the KV probe; returns (outputs, probe report, peak blocks of each reported request)."""
    warmup = [dict(frames=setting["frames"], seed=1, max_tokens=4)]
    llm_kwargs = {"max_model_len": args.max_model_len, **kwargs.pop("llm_kwargs", {})}
    result = run_offline(args.model, requests, setting["config"], plugins=setting["plugins"], warmup=warmup,
                         preload=["kv_probe"], env={"PYTHONPATH": str(BENCH)}, llm_kwargs=llm_kwargs,
                         timeout=3600, **kwargs)
    probe = result["reports"]["kv_probe"]
    # request ids are "<counter>-<suffix>": the warm-up request comes first
    peaks = [n for rid, n in sorted(probe["peak_blocks"].items(), key=lambda kv: int(kv[0].split("-")[0]))]
    return result["outputs"], probe, peaks[len(warmup):]


def measure(args, name: str, setting: dict, progress) -> dict:
    frames, tokens = setting["frames"], args.tokens
    lone, probe, peaks = _offline(args, setting, [dict(frames=frames, seed=100 + i, max_tokens=tokens)
                                                  for i in range(args.reps)])
    progress.update()
    row = dict(setting=name, frames=frames, prompt_tokens=lone[0]["num_prompt_tokens"],
               ttft_s=round(statistics.median(o["seconds"] - o["decode_s"] for o in lone), 3),
               decode_tok_s=round(statistics.median((tokens - 1) / o["decode_s"] for o in lone), 1),
               peak_kv_blocks_measured=max(peaks), block_size=probe["block_size"])
    outs, probe, _ = _offline(args, setting, [dict(frames=frames, seed=200 + i, max_tokens=tokens)
                                              for i in range(args.batch)], batch=True,
                              llm_kwargs={"max_num_seqs": args.batch, "num_gpu_blocks_override": args.kv_blocks})
    progress.update()
    wall = max(o["seconds"] for o in outs)
    row.update(batch_wall_s=round(wall, 2), batch_req_s=round(args.batch / wall, 3),
               batch_out_tok_s=round(args.batch * tokens / wall, 1), kv_budget_blocks=probe["num_blocks"],
               max_concurrent_measured=probe["peak_decoding"],
               max_concurrent_computed=probe["num_blocks"] // row["peak_kv_blocks_measured"],
               preemptions=probe["preemptions"])
    return row


def markdown(rows: list[dict], columns: dict[str, str], meta: dict) -> str:
    """A README-ready table: ``columns`` maps row keys to headers."""
    lines = [f"{meta['date']}, {meta['machine']}; vLLM {meta['vllm']}, torch {meta['torch']}, "
             f"{meta['threads']} threads; model {meta['model']}; {meta['settings']}"
             + (f"; FAILED: {meta['failed_settings']}" if meta.get("failed_settings") else ""), "",
             "| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ttft_s", "TTFT (s)"), ("decode_tok_s", "decode tokens/s (batch 1)"),
              ("batch_req_s", f"throughput, batch of {meta['batch']} (requests/s)"),
              ("max_concurrent_measured", f"max concurrent requests at {rows[0]['kv_budget_blocks']} KV blocks")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    names = [r["setting"] for r in rows]
    for ax, (key, title) in zip(axes.flat, panels):
        ax.bar(names, [r[key] for r in rows], color=[f"C{i}" for i in range(len(rows))])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    fig.suptitle(f"{Path(meta['model']).name}, {meta['settings']}\n{meta['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


COLUMNS = {"setting": "setting", "frames": "frames", "prompt_tokens": "prompt tokens", "ttft_s": "TTFT (s)",
           "decode_tok_s": "decode tok/s", "peak_kv_blocks_measured": "peak KV blocks / request",
           "batch_req_s": "batch req/s", "batch_out_tok_s": "batch out tok/s",
           "max_concurrent_measured": "max concurrent (measured)",
           "max_concurrent_computed": "max concurrent (blocks // peak)", "preemptions": "preemptions"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="models/qwen2-0.5b", help="LLaVA-OneVision checkpoint directory")
    ap.add_argument("--frames", type=int, default=16, help="frames per video (oracles get proportionally fewer)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per request (ignore_eos)")
    ap.add_argument("--reps", type=int, default=3, help="lone requests per setting (median reported)")
    ap.add_argument("--batch", type=int, default=16, help="requests in the throughput batch")
    ap.add_argument("--kv-blocks", type=int, default=128,
                    help="KV budget of the batch run, in blocks (128 x 128 tokens: about 5 vanilla 16-frame requests)")
    ap.add_argument("--max-model-len", type=int, default=4096, help="vLLM max_model_len (the KV budget must hold one such request)")
    ap.add_argument("--settings", default=",".join(NAMES), help="comma-separated subset of " + ",".join(NAMES))
    ap.add_argument("--quick", action="store_true",
                    help="models/tiny, 16 tokens, 2 reps, batch 8, 64 KV blocks (~5 min on 2 cores)")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.tokens, args.reps, args.batch, args.kv_blocks = "models/tiny", 16, 2, 8, 64
    from tqdm import tqdm

    chosen = {k: v for k, v in settings(args.model, args.frames).items() if k in args.settings.split(",")}
    t0 = time.time()
    rows, failed = [], []
    with tqdm(total=2 * len(chosen), desc="speed (processes)", unit="run") as progress:
        for name, setting in chosen.items():
            progress.set_postfix_str(name)
            try:
                rows.append(measure(args, name, setting, progress))
                tqdm.write(json.dumps(rows[-1]))
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # a failed engine: report it, measure the other settings
                failed.append(name)
                tqdm.write(f"{name} FAILED: {str(e)[-3000:]}")
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=machine(), vllm=_version("vllm"),
                torch=_version("torch"), threads=ENV["OMP_NUM_THREADS"], model=args.model, video_frames=args.frames,
                tokens=args.tokens, reps=args.reps, batch=args.batch, quick=args.quick,
                settings=f"offline LLM, in-process engine, fp32, eager, caches off, {args.frames}-frame videos, "
                         f"{args.tokens} tokens, batch {args.batch} at {args.kv_blocks} KV blocks",
                failed_settings=",".join(failed), wall_s=round(time.time() - t0))
    RESULTS.mkdir(exist_ok=True)
    append_csv(RESULTS / "speed.csv", meta, rows)
    (RESULTS / "speed.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    (RESULTS / "speed_latest.md").write_text(markdown(rows, COLUMNS, meta))
    plot(rows, meta, RESULTS / "speed.png")
    print((RESULTS / "speed_latest.md").read_text())
    print(f"wrote {RESULTS}/speed.csv, speed.json, speed.png, speed_latest.md in {meta['wall_s']} s")


if __name__ == "__main__":
    main()
