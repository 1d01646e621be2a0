"""Token-map pictures: what every method did to one request's visual tokens.

    TOKENZOOM_TRACE_DIR=/tmp/tz-traces vllm serve MODEL --plugin tokenzoom ...   # or LLM(...)
    python -m vllm_tokenzoom.tokenmap /tmp/tz-traces/<request id>.json --out map.png

With ``TOKENZOOM_TRACE_DIR`` set, the worker writes a record of each request that had a video
when it ends (``v1/worker/sessions.RequestSession.record``): where each visual token came
from (video, frame, cell), its death layer, and every in-LLM method's decisions. This renders
it, per video, as every frame's grid of cells (14 x 14 on LLaVA-OneVision):

1. *prefill*: grey = dropped before the LLM (TTM or a baseline); white = computed by every
   layer; orange = left the batch during prefill (FastV, VAS), the darker the earlier;
2. *decode* (with a decode method): green = share of decode steps in which DyCoke's ``dp``
   read the token (white: every step); blue = ZoomVLM's ``ata`` gave it copies (darker: more);
   black = ``ata`` deleted it; tokens that left before (grey, orange) as in the prefill panel;
3. *over decode steps*: each visual token (rows, in prompt order) at each decision (columns):
   the multiplicity it was read with in the covered layers (black 0, white 1, blue > 1).

ZoomVLM's Fig. 4 shows the idea. A frame whose every token was dropped before the LLM past
the last one kept is not drawn (the record knows frames from the tokens that reached the LLM).

Offline, vLLM releases the last requests of an ``LLM.generate`` call at the engine's next
step; call :func:`write_records` after it to have their records written now.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GREY, WHITE, BLACK = np.array([0.78, 0.78, 0.78]), np.ones(3), np.zeros(3)
ORANGE, GREEN, BLUE = np.array([0.93, 0.45, 0.05]), np.array([0.1, 0.6, 0.2]), np.array([0.15, 0.3, 0.85])


@dataclass
class VideoState:
    """One video's tokens, as frames x cells arrays (NaN / -1 where a token did not reach the LLM)."""

    reached: np.ndarray  # [T, C] bool
    layers_held: np.ndarray  # [T, C] share of the layers that computed it (1: all)
    dp_read: np.ndarray | None  # [T, C] share of decode steps dp read it
    ata_count: np.ndarray | None  # [T, C] its final ATA multiplicity


def decode_timeline(record: dict) -> tuple[list[int], np.ndarray]:
    """(query positions of the decisions, [S, V] the multiplicity each visual token was read with
    from there on in the layers the decode methods cover: dp's selection times ATA's counts)."""
    decisions, num_visual = record["decisions"], len(record["position"])
    events = sorted({e[0] for name in ("dp", "ata") for e in decisions.get(name, [])})
    dp = sorted(decisions.get("dp", []), key=lambda e: e[0])
    out = np.ones((len(events), num_visual))
    for s, position in enumerate(events):
        selection = next((sel for pos, sel in reversed(dp) if pos <= position), None)
        read = np.ones(num_visual) if selection is None else np.isin(np.arange(num_visual), selection).astype(float)
        out[s] = read * ata_counts(record, position)
    return events, out


def ata_counts(record: dict, position: float = math.inf) -> np.ndarray:
    """[V] each visual token's ATA multiplicity for the query at ``position`` (1 without ATA)."""
    counts = np.ones(len(record["position"]))
    for start, copied, deleted in record["decisions"].get("ata", []):
        if start <= position:
            np.add.at(counts, copied, 1)
            np.add.at(counts, deleted, -1)
    return counts


def video_states(record: dict) -> list[VideoState]:
    """Per video of the request, its frames x cells arrays (``VideoState``)."""
    video, frame, cell = (np.asarray(record[k]) for k in ("video", "frame", "cell"))
    held = (np.asarray(record["death"]) + 1) / record["num_layers"]
    dp_steps = record["decisions"].get("dp", [])
    dp_read = None
    if dp_steps:
        dp_read = np.zeros(len(video))
        for _, selection in dp_steps:
            dp_read[np.arange(len(video)) if selection is None else selection] += 1
        dp_read /= len(dp_steps)
    counts = ata_counts(record) if record["decisions"].get("ata") else None
    out = []
    for v, cells, lo, _ in _grids(record):
        ours = video == v
        mine = ours & (cell >= lo) & (cell < lo + cells)
        if cells <= 0 or not ours.any() or (frame[ours] < 0).any():
            raise ValueError(f"video {v}: the record does not say where its tokens came from")
        frames = int(frame[ours].max()) + 1
        index = frame[mine] * cells + cell[mine] - lo

        def grid(values):
            g = np.full(frames * cells, np.nan)
            g[index] = values[mine]
            return g.reshape(frames, cells)

        reached = np.zeros(frames * cells, dtype=bool)
        reached[index] = True
        out.append(VideoState(reached.reshape(frames, cells), grid(held),
                              None if dp_read is None else grid(dp_read), None if counts is None else grid(counts)))
    return out


def _grids(record: dict) -> list[tuple[int, int, int, str]]:
    """Per drawn grid: (its video, its cells per frame, its first cell, its label). A VOA video is
    two grids: its pooled overview cells, then its full-resolution cells (grey but the keyframes)."""
    pooled = record.get("pooled_cells") or [0] * len(record["cells"])
    out = []
    for v, (n, p) in enumerate(zip(record["cells"], pooled)):
        if p:
            out += [(v, p, 0, f"video {v} overview"), (v, n - p, p, f"video {v} keyframes")]
        else:
            out.append((v, n, 0, f"video {v}"))
    return out


def count_colors(count: np.ndarray) -> np.ndarray:
    """[...] multiplicities -> [..., 3]: black 0, white 1, blue > 1 (darker: more copies)."""
    extra = np.clip((count - 1) / 3, 0, 1)[..., None]
    copies = (1 - extra) * (0.5 * WHITE + 0.5 * BLUE) + extra * BLUE
    return np.where(count[..., None] > 1, copies, np.where(count[..., None] <= 0, BLACK, WHITE))


def prefill_colors(state: VideoState) -> np.ndarray:
    """[T, C, 3]: grey before the LLM, white through every layer, orange the earlier it left."""
    fade = np.nan_to_num(state.layers_held, nan=1.0)[..., None]
    rgb = fade * WHITE + (1 - fade) * ORANGE
    return np.where(state.reached[..., None], rgb, GREY)


def decode_colors(state: VideoState) -> np.ndarray:
    """[T, C, 3]: dp's read share (green to white), ATA's copies (blue) and deletions (black)."""
    rgb = np.broadcast_to(WHITE, state.reached.shape + (3,)).copy()
    if state.dp_read is not None:
        share = np.nan_to_num(state.dp_read, nan=1.0)[..., None]
        rgb = share * WHITE + (1 - share) * GREEN
    if state.ata_count is not None:
        count = np.nan_to_num(state.ata_count, nan=1.0)
        rgb = np.where((count != 1)[..., None], count_colors(count), rgb)
    left = np.nan_to_num(state.layers_held, nan=1.0) < 1  # left during prefill: as the prefill panel shows it
    return np.where(state.reached[..., None] & ~left[..., None], rgb, prefill_colors(state))


def mosaic(colors: np.ndarray, per_row: int = 8) -> np.ndarray:
    """[T, C, 3] -> one image of the T frames' g x g grids (g = sqrt(C)), ``per_row`` a row, 1 dark px apart."""
    frames, cells, _ = colors.shape
    g = math.isqrt(cells)
    if g * g != cells:
        raise ValueError(f"{cells} cells per frame is not a square grid")
    rows = math.ceil(frames / per_row)
    image = np.full((rows * (g + 1) - 1, min(frames, per_row) * (g + 1) - 1, 3), 0.35)  # dark lines between frames
    for t in range(frames):
        r, c = divmod(t, per_row)
        image[r * (g + 1):r * (g + 1) + g, c * (g + 1):c * (g + 1) + g] = colors[t].reshape(g, g, 3)
    return image


def render(record: dict, out: str | Path) -> Path:
    """Write the request's token map as a PNG (one column of panels per video)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = video_states(record)
    positions, timeline = decode_timeline(record)
    decoding = len(positions) > 0
    grids = [mosaic(prefill_colors(s)) for s in states]
    aspect = max(g.shape[0] / g.shape[1] for g in grids)  # a frame grid's height per unit of width
    heights = [aspect] + ([aspect, 0.6] if decoding else [])
    fig, axes = plt.subplots(len(heights), len(states), figsize=(8 * len(states), 8 * sum(heights) + 1),
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    methods = ", ".join(record["methods"]) or "pre-LLM only"
    for v, (state, (video, cells, lo, label)) in enumerate(zip(states, _grids(record))):
        axes[0][v].imshow(grids[v], interpolation="nearest")
        axes[0][v].set_title(f"{label}: prefill (grey: before the LLM; orange: left during prefill)", fontsize=8)
        if decoding:
            axes[1][v].imshow(mosaic(decode_colors(state)), interpolation="nearest")
            axes[1][v].set_title("decode (green: share dp read; blue: ata copies; black: ata deleted)", fontsize=8)
            cell = np.asarray(record["cell"])
            mine = (np.asarray(record["video"]) == video) & (cell >= lo) & (cell < lo + cells)
            axes[2][v].imshow(count_colors(timeline[:, mine].T), aspect="auto", interpolation="nearest")
            axes[2][v].set_title(f"over decode steps (columns: {len(positions)} decisions; rows: visual tokens)",
                                 fontsize=8)
            axes[2][v].set_xlabel("decision")
            axes[2][v].set_ylabel("visual token")
    for ax in np.ravel(axes):
        if not ax.get_xlabel():
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"request {record['request_id']}: {methods}", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_records(llm) -> None:
    """Offline: write the records of the requests the engine still holds state for (the last
    ones of the latest ``generate`` call) under ``TOKENZOOM_TRACE_DIR``."""
    from vllm_tokenzoom.v1.worker.sessions import write_live_records

    llm.apply_model(write_live_records)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Render a request's token map (a TOKENZOOM_TRACE_DIR record) as a PNG.")
    ap.add_argument("record", help="a <request id>.json written under TOKENZOOM_TRACE_DIR")
    ap.add_argument("--out", help="the PNG to write (default: next to the record)")
    args = ap.parse_args(argv)
    record = json.loads(Path(args.record).read_text())
    print(render(record, args.out or Path(args.record).with_suffix(".png")))


if __name__ == "__main__":
    main()
