"""What a request session costs (issue #10: compact history, bounded memory), without vLLM.

A DyCoke (``dp``, L=3) session of a 32-frame TTM prompt (2,960 visual tokens, 24 layers):
- memory of its view history after 1,000 decode steps, when every step re-selects (the
  random-weight model's worst case) and when none does after the first (the trained
  video-QA model: 0 re-selections in 47 steps, issue #3);
- time to hand a recomputed row (after preemption: the prompt plus T generated tokens in
  one prefill) the view of each of its queries at a pruned layer, T = 100, 200, 400 (was
  5.8 s / 19.6 s / 23.9 s per layer group at 100 / 200 / 400 by replaying every step,
  review-2026-12 C12).

    python benchmarks/session_costs.py

Writes benchmarks/results/session_costs.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ttft_ttm import isa  # noqa: E402
from ttft_ttm import RESULTS, machine  # noqa: E402

from vllm_tokenzoom.kv.token_map import TokenMap  # noqa: E402
from vllm_tokenzoom.methods import DP  # noqa: E402
from vllm_tokenzoom.v1.worker.sessions import RequestSession  # noqa: E402
from vllm_tokenzoom.v1.worker.step import Step  # noqa: E402

V, TEXT, LAYERS = 2960, 40, 24
N = V + 1 + TEXT


def session(threshold: float) -> RequestSession:
    token_map = TokenMap.build(N, [(20, V + 1)], [None])
    return RequestSession("r", token_map, LAYERS, {}, {"dp": DP(layer=3, threshold=threshold)})


def decode(s: RequestSession, steps: int, seed: int = 0) -> float:
    """``steps`` decode decisions (settled between steps as the runner does); -> seconds per step."""
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for t in range(steps):
        s.decide("dp", 2, N + t, torch.rand(V, generator=gen))
        s.settle()
    return (time.perf_counter() - t0) / steps


def history_bytes(s: RequestSession) -> int:
    history = s.view.layers["dp"].history
    return sum(v.numel() * v.element_size() for v in history.values if v is not None)


def recompute_seconds(s: RequestSession, generated: int) -> float:
    """needs() at a pruned layer for one row recomputing the prompt + ``generated`` tokens."""
    total = N + generated
    common = SimpleNamespace(num_reqs=1, query_start_loc_cpu=torch.tensor([0, total]), seq_lens=torch.tensor([total]),
                             seq_lens_cpu_upper_bound=None, num_actual_tokens=total)
    step = Step([s], LAYERS, [f"layers.{i}" for i in range(LAYERS)])
    step.bind(None, common)
    t0 = time.perf_counter()
    needs = step.needs(5)
    seconds = time.perf_counter() - t0
    assert len(needs) == generated and all(n.multiplicity is not None for n in needs)
    return seconds


def main() -> None:
    out = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=machine(), isa=isa(), visual_tokens=V, layers=LAYERS)
    for name, threshold in (("reselect every step", 1.0), ("never reselect", -1.0)):
        s = session(threshold)
        per_step = decode(s, 1000)
        out[name] = dict(decide_us_per_step=round(per_step * 1e6, 1), history_mb_per_1000_steps=round(
            history_bytes(s) / 1e6, 3), distinct_views=len(s.view.layers["dp"].history.values))
    for generated in (100, 200, 400):
        s = session(1.0)
        decode(s, generated)
        out[f"recompute with {generated} generated tokens (s)"] = round(recompute_seconds(s, generated), 4)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "session_costs.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
