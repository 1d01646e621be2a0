"""What tokenzoom adds to a decode step of requests without tokenzoom work: installed but not
enabled (issue #3 goal: at most 2% slower than vanilla), and the metrics' per-step paths on plain
requests (issue #13: at most 2% of a vanilla step).

End-to-end step times on this VM vary by +-20% between processes (see decode_dycoke.json),
far more than the effect, so the added work is timed directly instead: per engine step,
the runner hooks (``begin_step`` and ``release_gone`` with tokenzoom off), the metadata
builder's extra field (``with_step`` + the metadata copy), the scheduler mixin's report
lookup, the ``sample_tokens`` hook's check, and per layer the attention wrapper's fast-path test;
the metrics' paths a plain request's step passes (the scheduler mixin's figures lookup, the
front end's ``take_figures`` over the batch's outputs);
against vanilla's measured step time (decode_dycoke.json, batch 1, 16 frames, 24 layers).

    python benchmarks/inactive_overhead.py [--layers 24] [--batch 16]

Writes benchmarks/results/inactive_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ttft_ttm import RESULTS, machine  # noqa: E402


def per_call_us(fn, iters=20000) -> float:
    for _ in range(100):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    from vllm_tokenzoom.v1.attention.backends.cpu_attn import TokenZoomCPUAttentionMetadata
    from vllm_tokenzoom.v1.attention.backends.indexed import with_step
    from vllm_tokenzoom.metrics import take_figures
    from vllm_tokenzoom.v1.core.sched.scheduler import FIGURES_ATTR, REPORT_ATTR
    from vllm_tokenzoom.v1.worker.sessions import SESSIONS, begin_step, release_gone

    req_ids = [f"req-{i}" for i in range(args.batch)]
    requests = {rid: SimpleNamespace(mm_features=[], num_prompt_tokens=100) for rid in req_ids}
    runner = SimpleNamespace(get_model=lambda: SimpleNamespace(tokenzoom=None))
    cm = SimpleNamespace(num_reqs=args.batch, query_start_loc_cpu=torch.arange(args.batch + 1),
                         seq_lens=torch.full((args.batch,), 100))
    fields = {f: None for f in CPUAttentionMetadata.__dataclass_fields__}
    fields.update(num_actual_tokens=1, max_query_len=1, max_seq_len=1)
    stock_md = CPUAttentionMetadata(**fields)
    md = TokenZoomCPUAttentionMetadata(**fields)
    output = SimpleNamespace()

    class Stock:
        def forward(self, *args):
            return None

    class Wrapped(Stock):
        def forward(self, *args):  # the wrapper's frame and fast-path test around the stock call
            if getattr(md, "tz_step", None) is None:
                return super().forward(*args)

    stock, wrapped = Stock(), Wrapped()
    plain_outputs = [SimpleNamespace(request_id=rid, kv_transfer_params=None, finish_reason=None) for rid in req_ids]
    costs = {
        "runner hooks: begin_step + release_gone": per_call_us(
            lambda: (begin_step(runner, req_ids), release_gone(requests))),
        "builder: with_step (metadata copy)": per_call_us(
            lambda: with_step(TokenZoomCPUAttentionMetadata, None, stock_md, cm)),
        "scheduler mixin: report lookup": per_call_us(lambda: getattr(output, REPORT_ATTR, None)),
        "sample_tokens hook: check": per_call_us(lambda: bool(SESSIONS)),
        "scheduler mixin: figures lookup": per_call_us(lambda: getattr(output, FIGURES_ATTR, None)),
        f"front end: take_figures over {args.batch} plain outputs": per_call_us(
            lambda: take_figures({}, plain_outputs), iters=5000),
        f"attention wrapper (frame + fast-path test) x {args.layers} layers": args.layers * max(
            0.0, per_call_us(lambda: wrapped.forward(1, 2, 3)) - per_call_us(lambda: stock.forward(1, 2, 3))),
    }
    total_us = sum(costs.values())
    decode = json.loads((RESULTS / "decode_dycoke.json").read_text())
    vanilla = next(r for r in decode["rows"] if r["setting"] == "vanilla" and r["batch"] == 1)
    result = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=machine(), batch=args.batch,
                  costs_us={k: round(v, 2) for k, v in costs.items()}, total_us_per_step=round(total_us, 1),
                  vanilla_step_ms=vanilla["decode_step_ms"],
                  overhead_share=round(total_us / (1000 * vanilla["decode_step_ms"]), 5))
    (RESULTS / "inactive_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
