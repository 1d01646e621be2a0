"""Decode speed of DyCoke (TTM + dynamic pruning) against vanilla vLLM, TTM alone and the
oracle prompt, at batch 1 and batch 16 (issue #3, "Measure").

Each setting runs in its own process (general plugins load once per process) on the same
machine, one after the other (``--rounds`` repeats them interleaved; medians reported):
offline ``LLM``, in-process engine, fp32, eager; 16-frame videos, each request its own
video; caches off; 2 GiB of KV (16 vanilla requests fit at once). Batch 1: decode step time = the engine's time from the first to the last
token / (tokens - 1). Batch 16: requests' prefills and decodes interleave (chunked prefill);
the decode step time is the median over the engine steps in which all 16 requests decode
together (``step_probe.py`` times each step from one ``schedule`` call to the next), so
``--tokens`` must outlast the batch's prefills; also reported: tokens/s end to end (all
generated tokens / the batch's wall time, prefill included). The oracle prompt is vanilla vLLM given a video with about as
many visual tokens as the setting attends to (DyCoke: 1480 in the first L=3 layers, 444 in
the other 21 -> ~573 -> 3 frames; TTM: 1480 -> 8 frames).

    python benchmarks/decode_dycoke.py [--model models/qwen2-0.5b] [--tokens 32] [--batches 1,16] [--quick]

``cascade`` (TTM, VAS, dp) is measured against an oracle whose frame count is measured too:
the visual tokens its decode steps read, averaged over layers and steps (``attended_frames``).
``--paired``: a setting and its oracle in one process, batch after batch (``measure_paired``),
the oracle's requests with tokenzoom off; the ratio is taken per round.

    python benchmarks/decode_dycoke.py --batches 16 --tokens 48 --settings "cascade,oracle for cascade" --rounds 3 --paired

Writes benchmarks/results/decode_dycoke.{csv,json}.
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

BENCH = Path(__file__).resolve().parent

from vllm_tokenzoom.testing.offline import run_offline  # noqa: E402

SETTINGS = {  # name -> (additional_config, plugins loaded, frames)
    "vanilla": ({}, False, 16),
    "tokenzoom inactive": ({}, True, 16),
    "ttm": ({"tokenzoom": {"preset": "ttm"}}, True, 16),
    "dycoke": ({"tokenzoom": {"preset": "dycoke"}}, True, 16),
    "dycoke without key copy": ({"tokenzoom": {"preset": "dycoke", "methods": {"dp": {"key_copy": False}}}}, True, 16),
    "cascade": ({"tokenzoom": {"preset": "cascade"}}, True, 16),
    # ZoomVLM's ATA alone, the tokenizer's sentence ends: it reads every visual token; the
    # cost of scoring the sampling query at its 14 layers (10-23) each step
    "ata": ({"tokenzoom": {"methods": {"ata": {}}}}, True, 16),
    "oracle for ttm (8 frames)": ({}, False, 8),
    "oracle for dycoke (3 frames)": ({}, False, 3),
    "oracle for cascade": ({}, False, None),  # frames measured: attended_frames("cascade")
}
PER_FRAME = 196


def attended_frames(model: str, name: str, tokens: int, requests: int = 2) -> tuple[int, float]:
    """(frames, visual tokens) of a setting's oracle prompt: the visual tokens its decode steps
    read, averaged over layers and steps, measured from the decisions of a few requests
    (``TOKENZOOM_TRACE``; ``accuracy.mean_attended``)."""
    from accuracy import mean_attended

    from vllm_tokenzoom.config import parse_config

    config, _, frames = SETTINGS[name]
    methods = parse_config(config)
    layers = json.loads((Path(model) / "config.json").read_text())["text_config"]["num_hidden_layers"]
    visual = methods.pre_llm.num_kept_tokens(frames, PER_FRAME) if methods.pre_llm else frames * PER_FRAME
    runs = run_offline(model, [dict(frames=frames, seed=900 + i, max_tokens=tokens) for i in range(requests)],
                       config, trace=True, timeout=3600)["outputs"]
    mean = sum(mean_attended(out["traces"], visual, layers, methods.dp) for out in runs) / len(runs)
    return max(1, round(mean / PER_FRAME)), mean


def measure(model, name, batch, tokens, seed0, frames=None):
    config, plugins, fixed = SETTINGS[name]
    frames = fixed or frames
    requests = [dict(frames=frames, seed=seed0 + i, max_tokens=tokens) for i in range(batch)]
    warmup = [dict(frames=frames, seed=seed0 - 1, max_tokens=4)]
    t0 = time.perf_counter()
    result = _run(model, requests, config, plugins, batch, warmup, generate=True)
    outs = result["outputs"]
    wall = max(o["seconds"] for o in outs)
    row = dict(setting=name if fixed else f"{name} ({frames} frames)", batch=batch, frames=frames, prompt_tokens=outs[0]["num_prompt_tokens"],
               request_wall_s=round(wall, 2), tokens_per_s_end_to_end=round(batch * tokens / wall, 2),
               process_s=round(time.perf_counter() - t0, 1))
    if batch == 1:  # a lone request: every engine step after its first token is a decode step
        row["decode_step_ms"] = round(1000 * outs[0]["decode_s"] / (tokens - 1), 2)
    else:  # the steps in which all the batch's requests decode together (step_probe.py)
        probe = result["reports"]["step_probe"]
        full = [i for i, (n, _) in enumerate(probe["decode_steps"]) if n == batch]
        row["decode_steps_measured"] = len(full)
        if full:
            parts = step_parts(probe, full)
            row["decode_step_ms"] = round(parts.pop("step"), 2)
            # garbage collection within them
            row["decode_gc_ms_mean"] = round(1000 * statistics.mean(probe["decode_gc_s"][i] for i in full), 2)
            row["decode_kernel_ms"] = round(parts.pop("tz_kernel"), 2)  # tokenzoom's C++ kernel
            row["kernel_threads"] = probe["kernel_threads"]
            row.update({f"{k}_ms": round(v, 2) for k, v in parts.items() if k != "gc"})
        else:
            print(f"{name}: no step had all {batch} requests decoding; raise --tokens", flush=True)
    return row


def _run(model, requests, config, plugins, batch, warmup, generate: bool) -> dict:
    """The offline engine every measurement uses, the step probe loaded; ``generate``: all requests
    in one ``generate`` call, else ``batch`` at a time (batch after batch)."""
    return run_offline(model, requests, config, plugins=plugins, batch=True if generate else batch, warmup=warmup,
                       timeout=3600, llm_kwargs={"max_num_seqs": max(batch, 1), "max_model_len": 4096,
                                                 # batch > 1: two videos' prefill per step, so the prefills end early
                                                 **({"max_num_batched_tokens": 8192} if batch > 1 else {})},
                       preload=["step_probe"],
                       # 2 GiB of KV: 16 vanilla 16-frame requests (3,240 tokens each) fit at once
                       env={"PYTHONPATH": str(BENCH), "VLLM_CPU_KVCACHE_SPACE": "2"})


def measure_paired(model, name, oracle_frames, batch, tokens, rounds) -> dict:
    """``name`` and its oracle in one process, batch after batch (``name``'s, then the oracle's,
    ``rounds`` times): the engine has ``name``'s config, the oracle's requests turn tokenzoom off
    (a per-request ``{"preset": "none"}``). Both then run with the same engine settings and machine
    state, which separate processes on this VM do not give (the oracle alone moved by 22%
    between two runs). -> each round's decode step of both, and their ratio per round."""
    config, _, frames = SETTINGS[name]
    requests = []
    for r in range(rounds):
        requests += [dict(frames=frames, seed=2000 + 100 * r + i, max_tokens=tokens) for i in range(batch)]
        requests += [dict(frames=oracle_frames, seed=6000 + 100 * r + i, max_tokens=tokens, tokenzoom={"preset": "none"})
                     for i in range(batch)]
    result = _run(model, requests, config, True, batch, [dict(frames=frames, seed=1999, max_tokens=4)],
                  generate=False)
    outs = result["outputs"]
    oracle_outs = [o for r in range(rounds) for o in outs[(2 * r + 1) * batch:(2 * r + 2) * batch]]
    assert all(o["figures"] is None for o in oracle_outs), "an oracle request ran a tokenzoom method"
    probe = result["reports"]["step_probe"]
    by_batch: dict[str, list[int]] = {}  # the full decode steps of each batch, in the order the batches ran
    for i, ((n, _), key) in enumerate(zip(probe["decode_steps"], probe["decode_batch"])):
        if n == batch:
            by_batch.setdefault(key, []).append(i)
    parts = [step_parts(probe, steps) for steps in by_batch.values()]
    if len(parts) != 2 * rounds:
        raise SystemExit(f"{name}: {len(parts)} batches had all {batch} requests decoding, expected {2 * rounds}; "
                         "raise --tokens")
    mine, oracle = parts[0::2], parts[1::2]
    ratios = [round(a["step"] / b["step"], 3) for a, b in zip(mine, oracle)]
    row = dict(setting=f"{name} vs its oracle ({oracle_frames} frames), one process", batch=batch, frames=frames,
               oracle_frames=oracle_frames, prompt_tokens=outs[0]["num_prompt_tokens"],
               oracle_prompt_tokens=oracle_outs[0]["num_prompt_tokens"], rounds=rounds,
               step_vs_oracle=statistics.median(ratios),
               step_vs_oracle_all=ratios)
    for who, runs in (("", mine), ("oracle_", oracle)):
        for part in runs[0]:
            row[f"{who}{part}_ms"] = round(statistics.median(r[part] for r in runs), 2)
            row[f"{who}{part}_ms_all"] = [round(r[part], 2) for r in runs]
    return row


def step_parts(probe: dict, steps: list[int]) -> dict[str, float]:
    """Median ms per step of the probe's ``steps`` (indices): the whole step; vLLM's attention,
    tokenzoom's kernel, tokenzoom's Python in the attention layers (their time less those two)
    and in its hooks; the layers' other work; the rest of the step; garbage collection (within
    the others). Each a median of its own: they need not add up (step_probe.py)."""
    def median(values):
        return 1000 * statistics.median(values)

    spans = [probe["decode_spans_s"][i] for i in steps]
    kernel = [probe["decode_kernel_s"][i] for i in steps]
    step = [probe["decode_steps"][i][1] for i in steps]
    # vanilla vLLM has no tokenzoom layer: its attention is vLLM's kernel alone
    layer = [s["attention_layer"] or s["vllm_attention"] for s in spans]
    return dict(step=median(step), vllm_attention=median(s["vllm_attention"] for s in spans),
                tz_kernel=median(kernel),
                tz_attention_python=median(a - s["vllm_attention"] - k for a, s, k in zip(layer, spans, kernel)),
                tz_hooks=median(s["tz_hooks_forward"] + s["tz_hooks_runner"] for s in spans),
                layers_other=median(s["model_forward"] - a - s["tz_hooks_forward"] for a, s in zip(layer, spans)),
                step_other=median(t - s["model_forward"] - s["tz_hooks_runner"] for t, s in zip(step, spans)),
                gc=median(probe["decode_gc_s"][i] for i in steps))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/qwen2-0.5b")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat all settings this many times, interleaved; medians are reported "
                         "(this VM's run-to-run noise is +-30%%)")
    ap.add_argument("--quick", action="store_true", help="batch 1, 12 tokens")
    ap.add_argument("--paired", action="store_true",
                    help="each 'oracle for X' setting: X and its oracle in one process, batch after batch "
                         "(--rounds times each), instead of a process per setting (batch > 1)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.tokens = "1", 12
    rows, oracle = [], {}
    for name in args.settings.split(","):
        if SETTINGS[name][2] is None:  # "oracle for X": as many frames as X's decode steps read
            oracle[name] = attended_frames(args.model, name[len("oracle for "):], args.tokens)
            print(f"{name}: {oracle[name][0]} frames ({oracle[name][1]:.0f} visual tokens read per step)", flush=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        if args.paired:
            for name, (frames, _) in oracle.items():
                print(f"batch {batch}: {name[len('oracle for '):]} and its oracle, one process", flush=True)
                rows.append(measure_paired(args.model, name[len("oracle for "):], frames, batch, args.tokens,
                                           args.rounds))
                print(json.dumps(rows[-1]), flush=True)
            continue
        runs: dict[str, list[dict]] = {}
        for round_ in range(args.rounds):
            for name in args.settings.split(","):
                print(f"batch {batch}, round {round_ + 1}: {name}", flush=True)
                runs.setdefault(name, []).append(measure(args.model, name, batch, args.tokens, seed0=2000 + 100 * round_,
                                                         frames=oracle.get(name, (None,))[0]))
                print(json.dumps(runs[name][-1]), flush=True)
        for name, samples in runs.items():
            row = dict(samples[0], rounds=len(samples))
            for key in ("decode_step_ms", "decode_gc_ms_mean", "decode_kernel_ms", "tokens_per_s_end_to_end", "request_wall_s"):
                if key in row:
                    row[key] = statistics.median(r[key] for r in samples)
                    row[key + "_all"] = [r[key] for r in samples]
            rows.append(row)
    base = {r["batch"]: r for r in rows if r["setting"] == "vanilla"}
    for r in rows:
        if r["batch"] in base and "decode_step_ms" in r:
            r["step_vs_vanilla"] = round(r["decode_step_ms"] / base[r["batch"]]["decode_step_ms"], 3)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=machine(), model=args.model, tokens=args.tokens,
                vllm=_version("vllm"), torch=_version("torch"), mode="offline LLM, in-process engine, eager, fp32")
    path = RESULTS / "decode_dycoke.csv"
    append_csv(path, meta, rows)
    # the JSON keeps the latest row of each (batch, setting): runs of other batches are kept
    path_json = RESULTS / "decode_dycoke.json"
    kept = json.loads(path_json.read_text())["rows"] if path_json.exists() else []
    fresh = {(r["batch"], r["setting"]) for r in rows}
    rows_all = [r for r in kept if (r["batch"], r["setting"]) not in fresh] + [dict(r, **meta) for r in rows]
    path_json.write_text(json.dumps(dict(meta=meta, rows=sorted(rows_all, key=lambda r: r["batch"])), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
