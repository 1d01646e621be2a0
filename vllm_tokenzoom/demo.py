"""What tokenzoom gives a user (``make demo``): the same video questions to vanilla vLLM and to
vLLM with ``--plugin tokenzoom``, side by side.

Serves the committed trained video-QA checkpoint (``checkpoints/videoqa-deep``: a tiny
LLaVA-OneVision trained on the synthetic video-QA task, ``testing/videoqa.py``) twice -- plain,
then with tokenzoom -- asks each server the same questions about generated test clips through
the ``openai`` client (streamed: time to first token), and prints per question the truth and each
answer (right or wrong), then per server the accuracy, the visual tokens in the prompt, the time
to first token and the total time, and the token-map picture of one tokenzoom request.

    python -m vllm_tokenzoom.demo [--model checkpoints/videoqa-deep] [--clips 3] [--frames 32]
                                  [--additional-config '{"tokenzoom": {"preset": "ttm"}}']
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import tempfile
import time
from pathlib import Path

TEST_SEED = 2_000_000  # the video-QA task's test split (videoqa.SPLITS)


def ask(client, model: str, video: Path, question: str, max_tokens: int) -> dict:
    """One streamed chat completion: the answer, its prompt tokens, TTFT and total seconds."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, temperature=0.0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{video}"}},
                                               {"type": "text", "text": question}]}])
    text, first, usage, rid = [], None, None, None
    for chunk in stream:
        rid = rid or chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    return {"answer": "".join(text).strip(), "prompt_tokens": usage.prompt_tokens, "ttft": first or 0.0,
            "total": time.perf_counter() - t0, "id": rid}


def run_server(name: str, serve: list[str], env: dict, clips, model: str, max_tokens: int) -> list[list[dict]]:
    from openai import OpenAI

    from vllm_tokenzoom.testing.server import vllm_server

    env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    print(f"\n[{name}] $ {env_text + ' ' if env_text else ''}.venv/bin/vllm serve {shlex.join(serve)}", flush=True)
    t0 = time.perf_counter()
    with vllm_server(serve, env=env) as (url, _log):
        print(f"[{name}] up in {time.perf_counter() - t0:.0f} s; asking {sum(len(q) for _, _, q in clips)} questions",
              flush=True)
        client = OpenAI(base_url=url + "/v1", api_key="EMPTY")
        ask(client, model, clips[0][1], clips[0][2][0].text, 1)  # warm-up (first-request costs)
        return [[ask(client, model, path, q.text, max_tokens) for q in questions] for _, path, questions in clips]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="checkpoints/videoqa-deep", help="a trained video-QA checkpoint")
    ap.add_argument("--clips", type=int, default=3, help="test clips to ask about")
    ap.add_argument("--frames", type=int, default=32, help="frames per clip (the task's clips have 16-32)")
    ap.add_argument("--additional-config", default=None,
                    help="tokenzoom's config as JSON (default: --plugin tokenzoom's default preset, dycoke)")
    args = ap.parse_args(argv)

    from vllm_tokenzoom.testing import videoqa
    from vllm_tokenzoom.testing.server import cpu_serve_args
    from vllm_tokenzoom.testing.video import write_lossless

    model = str(Path(args.model).resolve())
    kinds = videoqa.trained_kinds(model)
    media = Path(tempfile.mkdtemp(prefix="tokenzoom-demo-"))
    clips = []
    for seed in videoqa.split_seeds("test", args.clips):
        clip = videoqa.make_clip(seed, num_frames=args.frames)
        questions = [q for q in videoqa.questions(clip) if q.kind in kinds]
        clips.append((clip, write_lossless(clip.frames, media / f"clip{seed - TEST_SEED}.avi"), questions))
    max_tokens = max(videoqa.answer_tokens(q.kind) for _, _, qs in clips for q in qs)
    # vLLM sizes its encoder cache for a 16-frame video at --max-model-len 8192 unless the batch
    # budget is larger: --max-num-batched-tokens 8192 lets a 32-frame video (6,273 tokens) in
    base = cpu_serve_args(model, num_frames=args.frames, media_dir=str(media)) + [
        "--served-model-name", "videoqa", "--max-num-batched-tokens", "8192"]
    zoom = base + ["--plugin", "tokenzoom"] + (["--additional-config", args.additional_config]
                                               if args.additional_config else [])
    traces = media / "traces"
    runs = {"vanilla vLLM": run_server("vanilla vLLM", base, {}, clips, "videoqa", max_tokens),
            "tokenzoom": run_server("tokenzoom", zoom, {"TOKENZOOM_TRACE_DIR": str(traces)}, clips, "videoqa",
                                    max_tokens)}
    report(clips, runs, args.frames, traces)


def report(clips, runs: dict, frames: int, traces: Path) -> None:
    names = list(runs)
    print(f"\n{'question':48s} {'truth':8s} " + " ".join(f"{n:>16s}" for n in names))
    for c, (clip, _, questions) in enumerate(clips):
        print(f"clip {clip.seed - TEST_SEED} ({frames} frames, {len(clip.flashes)} flashes)")
        for i, q in enumerate(questions):
            cells = [f"{runs[n][c][i]['answer'][:12]:>12s} {'ok' if runs[n][c][i]['answer'] == q.answer else 'NO':>3s}"
                     for n in names]
            print(f"  {q.text:46s} {q.answer:8s} " + " ".join(cells))
    per_frame = 196
    print(f"\n{'':24s} " + " ".join(f"{n:>16s}" for n in names))
    rows = {"accuracy": lambda rs, qs: f"{sum(r['answer'] == q.answer for r, q in zip(rs, qs)) / len(qs):.0%}",
            "visual tokens / video": None, "time to first token": lambda rs, _: f"{_median(rs, 'ttft'):.2f} s",
            "total time": lambda rs, _: f"{_median(rs, 'total'):.2f} s"}
    answers = {n: [r for run in runs[n] for r in run] for n in names}
    questions = [q for _, _, qs in clips for q in qs]
    text = answers[names[0]][0]["prompt_tokens"] - frames * per_frame - 1  # vanilla: all frames + a newline
    for label, fmt in rows.items():
        if fmt is None:
            cells = [f"{statistics.mean(r['prompt_tokens'] - text - 1 for r in answers[n]):.0f}" for n in names]
        else:
            cells = [fmt(answers[n], questions) for n in names]
        print(f"{label:24s} " + " ".join(f"{c:>16s}" for c in cells))
    print("(medians over the questions; one 2-core CPU, fp32; a tiny model, so the times show the prompt's "
          "share, not a 7B model's)")
    picture = _token_map(traces, answers["tokenzoom"][0]["id"])
    if picture:
        print(f"\nwhat tokenzoom kept of clip 0 (token map): {picture}")


def _median(rs, key: str) -> float:
    return statistics.median(r[key] for r in rs)


def _token_map(traces: Path, request_id: str) -> str | None:
    """The token-map PNG of one tokenzoom request (its record is written when its session ends)."""
    from vllm_tokenzoom import tokenmap

    found = sorted(traces.glob(f"{request_id}*.json")) or sorted(traces.glob("*.json"))
    if not found:
        return None
    out = found[0].with_suffix(".png")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints the path; the demo says what it is
        tokenmap.main([str(found[0]), "--out", str(out)])
    return str(out)


if __name__ == "__main__":
    main()
