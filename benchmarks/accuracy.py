"""Accuracy on the synthetic video-QA task through vLLM, per method and token budget (issue #4).

    python benchmarks/accuracy.py [--model checkpoints/videoqa-tiny] [--clips 200] [--quick]

Every setting runs the test split's questions (``vllm_tokenzoom.testing.videoqa``) through
offline ``LLM.generate`` (fp32, greedy, stop at EOS; each setting in its own process): full
tokens (tokenzoom installed but not enabled, which is token-identical to vanilla vLLM and,
unlike vanilla vLLM 0.32, survives batches of videos with different frame counts); TTM at several K; DyCoke (TTM + dynamic
pruning); and the baselines at TTM's budgets and at 15% (random drop, uniform frame
sampling, spatial pooling). Answers are exact match.

Visual tokens kept at prefill are measured from vLLM's prompt length (prompt tokens minus
the text's); for DyCoke, the tokens attended during decode are what its dynamic pruning
reads at every decode step from those (``DP.mean_attended``: all of them in layers < L,
the top 1 - P in the others, averaged over layers). The *layer-averaged visual KV share*
(methods-spec §0) is the share of the video's tokens whose KV a layer holds, averaged over
layers: the prefill share for pre-LLM methods (DyCoke's dp keeps its tokens: same share),
and for FastV ``(K V + (L - K) round(V (1 - R))) / (L V_video)``. FastV (K=2) runs at
R = 0.5, 0.75, 0.9, next to the baselines at the same shares.

Appends rows to benchmarks/results/accuracy.csv, writes accuracy.png (accuracy against
visual tokens kept) and accuracy_latest.md (the table the README quotes); ``--tag T`` names
the last two accuracy_T.png and accuracy_T_latest.md (a partial run, e.g. one kind).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import preset_fits  # noqa: E402
from ttft_ttm import RESULTS, _version, append_csv, machine  # noqa: E402

from vllm_tokenzoom.config import parse_config  # noqa: E402
from vllm_tokenzoom.methods import ATA, Stage  # noqa: E402
from vllm_tokenzoom.testing import videoqa  # noqa: E402
from vllm_tokenzoom.testing.offline import run_offline  # noqa: E402

TOKENS_PER_FRAME = 196


def ttm(k):
    return {"methods": {"ttm": {"prune_ratio": k}}}


def baseline(name, budget):
    return {"methods": {name: {"keep_ratio": round(budget, 3)}}}


FASTV_LAYER = 2


def fastv(r):
    return {"methods": {"fastv": {"layer": FASTV_LAYER, "prune_ratio": r}}}


def mean_attended(traces: dict, visual: int, num_layers: int, dp) -> float:
    """Visual tokens a decode step reads, averaged over layers and steps, from a request's
    decisions: a token counts at layer l while alive there (a prefill method's death layers)
    and, in layers >= dp's L, when that step's dp selection holds it."""
    death = [num_layers - 1] * visual
    for drop in reversed(traces.get(_prefill_name(traces), [])):  # the earliest drop a token missed is its death
        kept = set(drop["kept"] if isinstance(drop, dict) else drop[1])
        death = [drop_layer(drop) if v not in kept else d for v, d in enumerate(death)]
    alive = [sum(1 for d in death if d >= layer) for layer in range(num_layers)]
    if dp is None or not traces.get("dp"):
        return sum(alive) / num_layers if dp is None else dp.mean_attended(visual, num_layers)
    per_step = []
    for _, selection in traces["dp"]:
        chosen = None if selection is None else set(selection)
        per_step.append(sum(alive[layer] if layer < dp.layer or chosen is None else
                            sum(1 for v in chosen if death[v] >= layer) for layer in range(num_layers)) / num_layers)
    return sum(per_step) / len(per_step)


def _prefill_name(traces: dict) -> str:
    return next((n for n in ("fastv", "vas") if n in traces), "")


def drop_layer(drop) -> int:
    return drop["layer"] if isinstance(drop, dict) else drop[0]


def settings(quick: bool, num_layers: int) -> list[tuple[str, str, dict | None]]:
    """(name, method family, tokenzoom config or None for vanilla vLLM): the methods; the
    baselines come after them, at the shares the methods measured (``baselines``)."""
    ks = [0.7] if quick else [0.3, 0.7, 0.9]
    rs = [0.75] if quick else [0.5, 0.75, 0.9]
    out = [("full tokens", "full", None)]
    out += [(f"ttm K={k}", "ttm", ttm(k)) for k in ks]
    out += [(f"fastv K={FASTV_LAYER} R={r}", "fastv", fastv(r)) for r in rs]
    out += [("dycoke (K=0.7, L=3, P=0.7)", "dycoke", {"preset": "dycoke"})]
    if preset_fits("vas", num_layers):
        grid = [(0.3, 4)] if quick else [(r, i) for i in (4, 3) for r in (0.2, 0.3, 0.4, 0.5)]
        out += [(f"vas r={r} interval={i}" + (" (default)" if (r, i) == (0.3, 4) else ""), "vas",
                 {"methods": {"vas": {"ratio": r, "interval": i}}}) for r, i in grid]
        out += [("cascade (ttm K=0.7, vas, dp L=3 P=0.7)", "cascade", {"preset": "cascade"})]
    if num_layers > ATA().first_score_layer:  # ZoomVLM's ATA scores at layers 10..25 (clipped)
        out += [(f"ata every={e} copies=drops={m}" + (" (default)" if (e, m) == (3, 10) else ""), "ata",
                 {"methods": {"ata": {"every": e, "copies": m, "drops": m}}})
                for e, m in ([(3, 10)] if quick else [(3, 10), (1, 10), (1, 100)])]
        if not quick:  # which half of the default's adjustment costs accuracy: the copies or the drops
            out += [(f"ata every=3 copies={c} drops={d}", "ata", {"methods": {"ata": {"every": 3, "copies": c, "drops": d}}})
                    for c, d in ((10, 0), (0, 10))]
        # one-word answers end before token s = 20: VOA's answer here is its overview pass's
        out += [("voa (overview: 22/32 frames at 10x10)", "voa", {"methods": {"voa": {}}})]
        out += [("zoomvlm (voa + ata, the paper's defaults)", "zoomvlm", {"preset": "zoomvlm"})]
        # describe's answers (<= 16 tokens) end before s = 20: at s = 4 the second pass runs
        out += [("zoomvlm s=4", "zoomvlm", {"preset": "zoomvlm", "methods": {"voa": {"probe_tokens": 4}}})]
    return out


# the methods' settings whose layer-averaged shares the baselines are run at (and 15%)
BASELINE_AT = ("ttm K=0.3", "ttm K=0.7", "ttm K=0.9", f"fastv K={FASTV_LAYER} R=0.5", f"fastv K={FASTV_LAYER} R=0.75",
               "vas r=0.3 interval=4 (default)", "vas r=0.5 interval=3", "cascade (ttm K=0.7, vas, dp L=3 P=0.7)")


def baselines(rows: list[dict], quick: bool, families: str = "") -> list[tuple[str, str, dict]]:
    """Random drop, frame sampling and spatial pooling at the layer-averaged shares the methods
    measured (``BASELINE_AT``, those that ran; of ``families`` only, where given) and at 15%."""
    at = [r["visual_kv_share"] for r in rows if r["setting"] in BASELINE_AT
          and (not families or r["method"] in families.split(","))]
    budgets = sorted({round(b, 2) for b in at} | {0.15}, reverse=True)
    if quick:
        budgets = budgets[:2] + [0.15]
    return [(f"{name} {b:.2f}", name, baseline(name, b)) for name in ("random_drop", "frame_sampling", "spatial_pool")
            for b in budgets]


def _ttm_budget(k: float, frames=range(16, 33)) -> float:
    """Mean share of visual tokens TTM at K keeps over the task's frame counts."""
    policy = parse_config({"tokenzoom": ttm(k)}).ttm
    return sum(policy.num_kept_tokens(t, TOKENS_PER_FRAME) / (t * TOKENS_PER_FRAME) for t in frames) / len(frames)


def run_setting(model: str, name: str, config: dict | None, questions, tokenizer, chunk: int,
                num_layers: int) -> dict:
    from vllm_tokenzoom.testing.video import chat_prompt

    requests = [dict(videoqa_clip=clip.seed, question=q.text, max_tokens=videoqa.answer_tokens(q.kind), stop_at_eos=True)
                for clip, q in questions]
    parsed = parse_config({"tokenzoom": config}) if config is not None else None
    traced = parsed is not None and bool(parsed.stage(Stage.PREFILL))  # a data-dependent share (VAS)
    t0 = time.perf_counter()
    result = run_offline(model, requests, {"tokenzoom": config} if config is not None else {},
                         batch=chunk, timeout=7200, trace=traced,
                         # VOA's second pass is built from the first's processed video: no processor cache
                         llm_kwargs={"mm_processor_cache_gb": 0 if parsed is not None and parsed.voa else 2,
                                     "max_num_seqs": chunk,
                                     "max_num_batched_tokens": 8192})  # a 32-frame video: 6,273 tokens
    seconds = time.perf_counter() - t0
    dp = parsed.dp if parsed is not None else None
    right: dict[str, list[int]] = {}
    kept, attended, shares = [], [], []
    for (clip, q), out in zip(questions, result["outputs"]):
        right.setdefault(q.kind, []).append(int(out["text"].strip() == q.answer))
        text = len(tokenizer(chat_prompt(tokenizer, q.text)).input_ids) - 1  # minus the <video> placeholder
        visual = out["num_prompt_tokens"] - text - 1  # minus the newline
        traces = out["traces"] or {}
        read = mean_attended(traces, visual, num_layers, dp)
        video = clip.num_frames * TOKENS_PER_FRAME
        kept.append(visual / video)
        attended.append(read / video)
        shares.append(traces.get("visual_kv_share", 1.0) * visual / video)
    every = [x for v in right.values() for x in v]
    return dict(accuracy=sum(every) / len(every), per_kind={k: round(sum(v) / len(v), 3) for k, v in sorted(right.items())},
                prefill_kept=sum(kept) / len(kept), decode_attended=sum(attended) / len(attended),
                visual_kv_share=sum(shares) / len(shares), seconds=seconds)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="checkpoints/videoqa-tiny")
    ap.add_argument("--clips", type=int, default=200, help="test clips (about 5.7 questions each)")
    ap.add_argument("--kinds", default="", help="comma-separated question kinds to ask (default: those the "
                                               f"checkpoint was trained on; all: {','.join(videoqa.KINDS)})")
    ap.add_argument("--chunk", type=int, default=48, help="requests per generate call")
    ap.add_argument("--only", default="", help="comma-separated method families to run (default: all)")
    ap.add_argument("--match", default="", help="comma-separated; run only the settings whose name contains one")
    ap.add_argument("--budgets", default="", help="comma-separated baseline budgets to run (default: all of them)")
    ap.add_argument("--baselines-for", default="",
                    help="comma-separated method families whose measured shares the baselines run at (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="40 clips; TTM K=0.7, FastV R=0.75, DyCoke, baselines at their shares and 15%%")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the results (default: benchmarks/results)")
    ap.add_argument("--tag", default="", help="name a partial run's table and plot accuracy_TAG_latest.md and "
                                             "accuracy_TAG.png (default: the main ones the README quotes)")
    args = ap.parse_args(argv)
    if args.quick:
        args.clips = min(args.clips, 40)
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    num_layers = AutoConfig.from_pretrained(args.model).text_config.num_hidden_layers
    args.kinds = args.kinds or ",".join(videoqa.trained_kinds(args.model))
    clips = [videoqa.make_clip(s, render=False) for s in videoqa.split_seeds("test", args.clips)]
    questions = [(c, q) for c in clips for q in videoqa.questions(c) if q.kind in args.kinds.split(",")]

    def picked(name: str, family: str) -> bool:  # --only and --match
        return ((not args.only or family in args.only.split(","))
                and (not args.match or any(m in name for m in args.match.split(","))))

    chosen = [s for s in settings(args.quick, num_layers) if picked(*s[:2])]
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=machine(), vllm=_version("vllm"),
                torch=_version("torch"), model=args.model, task=f"videoqa v{videoqa.VERSION}", kinds=args.kinds, clips=args.clips,
                questions=len(questions))
    rows = []

    def run(name, family, config):
        r = run_setting(args.model, name, config, questions, tokenizer, args.chunk, num_layers)
        rows.append({**meta, "setting": name, "method": family, "config": json.dumps(config),
                     "prefill_kept": round(r["prefill_kept"], 4),
                     "decode_attended": round(r["decode_attended"], 4),
                     "visual_kv_share": round(r["visual_kv_share"], 4),
                     "accuracy": round(r["accuracy"], 4), "per_kind": json.dumps(r["per_kind"]),
                     "seconds": round(r["seconds"], 1)})
        tqdm.write(f"{name:32s} kept {rows[-1]['prefill_kept']:.3f}  share {rows[-1]['visual_kv_share']:.3f}  "
                   f"accuracy {rows[-1]['accuracy']:.3f}  {r['per_kind']}")

    for setting in tqdm(chosen, desc="methods", unit="setting"):
        run(*setting)
    more = [s for s in baselines(rows, args.quick, args.baselines_for) if picked(*s[:2])]
    if args.budgets:
        wanted = {f"{float(b):.2f}" for b in args.budgets.split(",")}
        more = [s for s in more if s[0].split()[-1] in wanted]
    for setting in tqdm(more, desc="baselines", unit="setting"):
        run(*setting)
    save(rows, Path(args.out), args.tag)


def save(rows, results: Path = RESULTS, tag: str = "") -> None:
    results.mkdir(parents=True, exist_ok=True)
    # rows from before the task / kinds columns: task v1, its six kinds
    append_csv(results / "accuracy.csv", {}, rows,
               defaults={"task": "videoqa v1", "kinds": "count,first,last,presence,order,side"})
    m = rows[0]
    lines = [f"Accuracy on the video-QA test split ({m['clips']} clips, {m['questions']} questions, exact match), "
             f"{m['model']} ({m['task']}; kinds {m['kinds']}), vLLM {m['vllm']}, {m['machine']}, {m['date']}:", "",
             "| setting | visual tokens kept (prefill) | layer-averaged visual KV share | attended (decode) | accuracy |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['prefill_kept']:.1%} | {r['visual_kv_share']:.1%} | {r['decode_attended']:.1%} | "
              f"{r['accuracy']:.1%} |" for r in rows]
    name = f"accuracy_{tag}" if tag else "accuracy"
    (results / f"{name}_latest.md").write_text("\n".join(lines) + "\n")
    plot(rows, results / f"{name}.png")
    print("\n".join(lines))


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, marker in zip(dict.fromkeys(r["method"] for r in rows), "o^xsDv*P"):
        pts = sorted((r["visual_kv_share"], r["accuracy"]) for r in rows if r["method"] == family)
        ax.plot(*zip(*pts), marker=marker, markersize=8, label=family, linestyle="-" if len(pts) > 1 else "none")
    ax.set_xlabel("layer-averaged visual KV share (of the video's tokens)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(f"video-QA test split, {rows[0]['questions']} questions ({rows[0]['date']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
