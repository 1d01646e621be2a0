"""Serving benchmark: ``vllm serve`` per setting, ``vllm bench serve`` against it with video
chat requests at concurrency 1 / 4 / 16 (issue #4, "Speed and memory benchmarks").

Settings as in speed.py, all in one run on the same machine: vanilla vLLM, tokenzoom's
``ttm`` and ``dycoke`` presets (``--plugin tokenzoom --additional-config``), and the oracle
prompts: vanilla vLLM sampling proportionally fewer frames from the same videos (the
request-level ``media_io_kwargs`` ``num_frames``; vanilla and the oracles share one server,
which loads no plugin: ``VLLM_PLUGINS=none``). Flags: README's CPU flags (fp32, eager), prefix caching and the
multimodal processor cache off; every request has its own synthetic mp4 (the same files for
every setting; distinct across concurrency levels).

The client is vLLM's own ``vllm bench serve`` (run in this process through
``vllm.benchmarks.serve``): it sends videos with its ``sharegpt`` dataset (a JSON file whose
entries carry a ``video`` path, sent as a ``file://`` ``video_url`` through the ``openai-chat``
backend). ``--ignore-eos`` makes every reply ``--tokens`` long. Reported per setting and
concurrency: request throughput, TTFT p50, end-to-end latency p50, output tokens/s.

    python benchmarks/serve.py [--model models/qwen2-0.5b] [--concurrency 1,4,16] [--quick]

Appends rows to benchmarks/results/serve.csv; writes serve.json, serve.png and serve_latest.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import NAMES, markdown, settings  # noqa: E402
from ttft_ttm import RESULTS, _version, append_csv, machine  # noqa: E402

from vllm_tokenzoom.testing.server import CPU_ENV, cpu_serve_args, vllm_server  # noqa: E402

QUESTION = "Describe what happens in this video."


def write_dataset(media: Path, frames: int, levels: dict[int, int]) -> dict[int, Path]:
    """One ShareGPT-style JSON per concurrency level, each entry with its own mp4."""
    from vllm_tokenzoom.testing.video import make_video, write_mp4

    paths, seed = {}, 1000
    for c, n in levels.items():
        entries = []
        for _ in range(n):
            video = write_mp4(make_video(frames, seed=seed), media / f"video{seed}.mp4")
            entries.append({"video": str(video), "conversations": [{"from": "human", "value": QUESTION},
                                                                   {"from": "gpt", "value": "A video."}]})
            seed += 1
        paths[c] = media / f"requests_c{c}.json"
        paths[c].write_text(json.dumps(entries))
    return paths


def bench(url: str, model: str, dataset: Path, n: int, concurrency: int, tokens: int, frames: int, log) -> dict:
    """``vllm bench serve`` in this process, each request asking for ``frames`` frames; its report
    goes to ``log``, its progress bar to stderr."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai-chat", "--base-url", url, "--endpoint", "/v1/chat/completions", "--model", model,
        "--dataset-name", "sharegpt", "--dataset-path", str(dataset), "--num-prompts", str(n),
        "--max-concurrency", str(concurrency), "--sharegpt-output-len", str(tokens), "--ignore-eos",
        "--temperature", "0", "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50",
        "--extra-body", json.dumps({"media_io_kwargs": {"video": {"num_frames": frames}}})])
    with contextlib.redirect_stdout(log):
        return bench_main(args)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="models/qwen2-0.5b", help="LLaVA-OneVision checkpoint directory")
    ap.add_argument("--frames", type=int, default=16, help="frames per video (oracles sample proportionally fewer)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per request (ignore_eos)")
    ap.add_argument("--concurrency", default="1,4,16", help="client concurrency levels")
    ap.add_argument("--requests", type=int, default=2, help="requests per level = max(8, this x concurrency)")
    ap.add_argument("--settings", default=",".join(NAMES), help="comma-separated subset of " + ",".join(NAMES))
    ap.add_argument("--quick", action="store_true",
                    help="models/tiny, 16 tokens, requests = max(2, concurrency) per level (~3 min on 2 cores)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the results (default: benchmarks/results)")
    args = ap.parse_args(argv)
    results = Path(args.out)
    minimum = 8
    if args.quick:
        args.model, args.tokens, args.requests, minimum = "models/tiny", 16, 1, 2
    levels = {int(c): max(minimum, args.requests * int(c)) for c in args.concurrency.split(",")}
    from tqdm import tqdm

    chosen = {k: v for k, v in settings(args.model, args.frames).items() if k in args.settings.split(",")}
    media = Path(tempfile.mkdtemp(prefix="tokenzoom-serve-"))
    datasets = write_dataset(media, args.frames, levels)
    log_path = media / "bench_serve.log"
    t0, rows, failed = time.time(), [], []
    results.mkdir(parents=True, exist_ok=True)
    # one server per engine config: vanilla and the oracles share one, each oracle asking for
    # fewer frames per request (vLLM's request-level media_io_kwargs)
    servers: dict[str, dict[str, dict]] = {}
    for name, s in chosen.items():
        servers.setdefault(json.dumps([s["config"], s["plugins"]]), {})[name] = s
    with open(log_path, "w") as log, tqdm(total=len(chosen) * len(levels), desc="serve (setting x concurrency)") as bar:
        for group in servers.values():
            first = next(iter(group.values()))
            bar.set_postfix_str(f"starting vllm serve for {', '.join(group)}")
            serve = cpu_serve_args(args.model, num_frames=args.frames, media_dir=str(media))
            serve += ["--no-enable-prefix-caching", "--mm-processor-cache-gb", "0", "--trust-request-mm-kwargs"]
            if first["plugins"]:
                serve += ["--plugin", "tokenzoom", "--additional-config", json.dumps(first["config"])]
            try:
                with vllm_server(serve, env=None if first["plugins"] else {"VLLM_PLUGINS": "none"}) as (url, _):
                    for name, s in group.items():
                        for c, n in levels.items():
                            bar.set_postfix_str(f"{name}, concurrency {c}")
                            r = bench(url, args.model, datasets[c], n, c, args.tokens, s["frames"], log)
                            rows.append(dict(setting=name, frames=s["frames"], concurrency=c, requests=r["completed"],
                                             failed_requests=r.get("failed", n - r["completed"]),
                                             req_s=round(r["request_throughput"], 3),
                                             ttft_p50_s=round(r["median_ttft_ms"] / 1000, 3),
                                             latency_p50_s=round(r["median_e2el_ms"] / 1000, 3),
                                             out_tok_s=round(r["output_throughput"], 1)))
                            tqdm.write(json.dumps(rows[-1]))
                            bar.update()
            except (RuntimeError, TimeoutError, KeyError) as e:  # a failed server or client: go on
                failed += list(group)
                tqdm.write(f"{', '.join(group)} FAILED: {str(e)[-3000:]}")
    order = {name: i for i, name in enumerate(chosen)}
    rows.sort(key=lambda r: (order[r["setting"]], r["concurrency"]))
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=machine(), vllm=_version("vllm"),
                torch=_version("torch"), threads="bound to cores " + CPU_ENV["VLLM_CPU_OMP_THREADS_BIND"], model=args.model,
                video_frames=args.frames, tokens=args.tokens, quick=args.quick,
                settings=f"vllm serve (fp32, eager, caches off, VLLM_CPU_KVCACHE_SPACE={CPU_ENV['VLLM_CPU_KVCACHE_SPACE']}) "
                         f"+ vllm bench serve, {args.frames}-frame mp4s, {args.tokens} tokens",
                failed_settings=",".join(failed), wall_s=round(time.time() - t0))
    append_csv(results / "serve.csv", meta, rows)
    (results / "serve.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    columns = {"setting": "setting", "frames": "frames", "concurrency": "concurrency", "requests": "requests",
               "req_s": "req/s", "ttft_p50_s": "TTFT p50 (s)", "latency_p50_s": "latency p50 (s)",
               "out_tok_s": "output tok/s"}
    (results / "serve_latest.md").write_text(markdown(rows, columns, meta))
    plot(rows, meta, results / "serve.png")
    print((results / "serve_latest.md").read_text())
    print(f"wrote {results}/serve.csv, serve.json, serve.png, serve_latest.md (the client's "
          f"reports: {log_path}) in {meta['wall_s']} s")


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for i, name in enumerate(dict.fromkeys(r["setting"] for r in rows)):
        mine = [r for r in rows if r["setting"] == name]
        for ax, key in zip(axes, ("req_s", "ttft_p50_s", "latency_p50_s")):
            ax.plot([r["concurrency"] for r in mine], [r[key] for r in mine], "o-", color=f"C{i}", label=name)
    for ax, title in zip(axes, ("requests/s", "TTFT p50 (s)", "latency p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{Path(meta['model']).name}, {meta['settings']}\n{meta['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
