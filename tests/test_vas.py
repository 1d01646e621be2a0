"""VAS's policy (methods-spec.md §1.2-1.3), hand-derived: when a drop happens, on which axis,
how many frames or cells leave and which; the layer-averaged visual KV share of the paper's
forced schedule (methods-spec §1.1's worked example)."""
import pytest
import torch

from vllm_tokenzoom.config import parse_config
from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.kv.token_map import TokenMap
from vllm_tokenzoom.kv.view import visual_kv_share
from vllm_tokenzoom.methods.base import KeptTokens
from vllm_tokenzoom.methods.vas import VAS


def grid(frames: int, cells: int, videos: int = 1) -> TokenMap:
    """``videos`` videos of ``frames`` x ``cells`` tokens each, one after the other in a prompt."""
    spans, kept, offset = [], [], 5
    for _ in range(videos):
        spans.append((offset, frames * cells + 1))
        kept.append(KeptTokens.every(frames, cells))
        offset += frames * cells + 1
    return TokenMap.build(offset + 10, spans, kept)


def prefill(vas: VAS, token_map: TokenMap, scores_at, num_layers: int):
    """Drive one prefill as the session does: the policy decides at every layer it scores at,
    from ``scores_at(layer)`` [V] (0 for tokens already dead). -> (death layers [V], trace)."""
    vas = vas.for_model(num_layers)
    state, trace = vas.start(token_map), []
    death = torch.full((token_map.num_visual,), num_layers - 1)
    asked = {a.layer for a in vas.score_requests()}
    for layer in range(num_layers):
        if layer in asked:
            dropped, state = vas.decide(layer, scores_at(layer) * (death >= layer), state)
            if dropped is not None:
                death[dropped] = layer
                trace.append(vas.describe(layer, dropped, state))
    return death, trace


def per_frame(totals: dict[int, list[float]], cells: int):
    """Token scores from frame totals per layer (spread evenly over the frame's cells)."""
    def at(layer):
        return torch.tensor([totals[layer][f] / cells for f in range(len(totals[layer])) for _ in range(cells)])
    return at


def test_forced_drops_give_the_papers_schedule_and_share():
    """methods-spec §1.1: LLaVA-OV-7B (28 layers), 32 frames, start 2, end 23, r = 0.3, no
    shrinking (equal scores): interval 4 drops at 5, 9, 13, 17, 21 and the frames go
    32 -> 22 -> 15 -> 10 -> 7 -> 5, a share of 48.9%; interval 3: 39.7%."""
    token_map = grid(32, 196)
    flat = lambda layer: torch.ones(token_map.num_visual)  # noqa: E731
    death, trace = prefill(VAS(ratio=0.3, interval=4, start_layer=2), token_map, flat, 28)
    assert [t["layer"] for t in trace] == [5, 9, 13, 17, 21]
    assert [len(t["frames"]) for t in trace] == [22, 15, 10, 7, 5]
    assert all(t["axis"] == "frames" and len(t["cells"]) == 196 for t in trace)  # a tie goes to frames
    assert trace[0]["frames"] == list(range(22))  # equal D: the later frames leave first
    assert visual_kv_share(death, 28) == pytest.approx(438 / 896) and round(visual_kv_share(death, 28), 3) == 0.489
    death, trace = prefill(VAS(ratio=0.3, interval=3, start_layer=2), token_map, flat, 28)
    assert [t["layer"] for t in trace] == [4, 7, 10, 13, 16, 19, 22]
    assert round(visual_kv_share(death, 28), 3) == 0.397


# four frames whose totals over three layers are (shrinking, shrinking, growing, growing);
# every layer's total is 12, so the cells (equal shares of each frame) never shrink
TOTALS = {0: [4, 5, 1, 2], 1: [3, 3, 2, 4], 2: [2, 1, 3, 6]}


def test_a_drop_when_more_than_r_of_the_frames_shrank_ranked_literally():
    """Frames 0 and 1 shrank (1/2 > r = 0.3): a drop at start + 2 on the frame axis, of
    floor(0.3 * 4 + 0.5) = 1 frame, the lowest D = X_k - X_{k-1} + X_{k-2}: (3, 3, 2, 4) -> frame 2
    (a trend X_k - X_{k-2} would have removed frame 1)."""
    death, trace = prefill(VAS(ratio=0.3, interval=10, start_layer=0, end_layer=2), grid(4, 4),
                           per_frame(TOTALS, 4), 4)
    assert trace == [dict(layer=2, axis="frames", frames=[0, 1, 3], cells=[0, 1, 2, 3],
                          kept=[*range(0, 8), *range(12, 16)])]
    assert death.tolist() == [3] * 8 + [2] * 4 + [3] * 4
    _, trace = prefill(VAS(ratio=0.3, interval=10, start_layer=0, end_layer=2, coefficients=(1.0, 0.0, -1.0)),
                       grid(4, 4), per_frame(TOTALS, 4), 4)
    assert trace[0]["frames"] == [0, 2, 3]


def test_no_drop_without_shrinking_before_the_interval():
    """The same scores with r = 0.5: half of the frames shrank, not more; interval not reached."""
    _, trace = prefill(VAS(ratio=0.5, interval=10, start_layer=0, end_layer=2), grid(4, 4), per_frame(TOTALS, 4), 4)
    assert trace == []


def test_cells_that_shrink_are_dropped_as_whole_cells():
    """The transposed scores: the cells shrink, the frames do not -> a drop of one cell in every frame."""
    at = per_frame(TOTALS, 4)
    transposed = lambda layer: at(layer).view(4, 4).t().flatten()  # noqa: E731
    death, trace = prefill(VAS(ratio=0.3, interval=10, start_layer=0, end_layer=2), grid(4, 4), transposed, 4)
    assert trace[0]["axis"] == "cells" and trace[0]["cells"] == [0, 1, 3] and trace[0]["frames"] == [0, 1, 2, 3]
    assert death.view(4, 4)[:, 2].tolist() == [2] * 4


def test_both_axes_fire_the_larger_shrink_fraction_wins():
    """Frames: 2 of 4 shrink; cells: 3 of 4 shrink -> cells. Scores x[f, c] = a_f * b_c."""
    a = {0: [4, 4, 1, 1], 1: [3, 3, 2, 2], 2: [2, 2, 3, 3]}
    b = {0: [4, 4, 4, 1], 1: [3, 3, 3, 2], 2: [2, 2, 2, 3]}
    at = lambda k: (torch.tensor(a[k])[:, None] * torch.tensor(b[k])[None, :]).flatten().float()  # noqa: E731
    _, trace = prefill(VAS(ratio=0.3, interval=10, start_layer=0, end_layer=2), grid(4, 4), at, 4)
    assert trace[0]["axis"] == "cells" and len(trace[0]["cells"]) == 3
    _, trace = prefill(VAS(ratio=0.3, interval=10, start_layer=0, end_layer=2, axis="frames"), grid(4, 4), at, 4)
    assert trace[0]["axis"] == "frames" and len(trace[0]["frames"]) == 3


def test_group_count_rounds_half_up_and_leaves_one():
    """floor(r * count + 0.5), at least 1, at most count - 1 (5 frames at r = 0.5: 3, where
    Python's round would give 2; 2 frames at r = 0.9: 1)."""
    _, trace = prefill(VAS(ratio=0.5, interval=1, start_layer=0, end_layer=2), grid(5, 4),
                       lambda k: torch.ones(20), 4)
    assert [len(t["frames"]) for t in trace] == [2]
    _, trace = prefill(VAS(ratio=0.9, interval=1, start_layer=0, end_layer=3), grid(2, 4), lambda k: torch.ones(8), 5)
    assert [(t["axis"], len(t["frames"]), len(t["cells"])) for t in trace] == [("frames", 1, 4), ("cells", 1, 1)]


def test_decisions_start_two_layers_after_the_start_and_stop_at_the_end():
    flat = lambda layer: torch.ones(4 * 4)  # noqa: E731
    _, trace = prefill(VAS(ratio=0.3, interval=1, start_layer=1, end_layer=5), grid(4, 4), flat, 8)
    assert [t["layer"] for t in trace] == [3, 4, 5]  # frames 4 -> 3 -> 2 -> 1
    _, trace = prefill(VAS(ratio=0.3, interval=1, start_layer=1, end_layer=6), grid(4, 4), flat, 8)
    assert [t["layer"] for t in trace] == [3, 4, 5, 6] and trace[-1]["axis"] == "cells"  # one frame left
    _, trace = prefill(VAS(ratio=0.3, interval=1, start_layer=0, end_layer=3), grid(1, 1), lambda k: torch.ones(1), 5)
    assert trace == []  # one frame, one cell: nothing to drop


def test_drop_all_at_end():
    flat = lambda layer: torch.ones(4 * 4)  # noqa: E731
    death, trace = prefill(VAS(interval=10, start_layer=0, end_layer=3, drop_all_at_end=True), grid(4, 4), flat, 6)
    assert trace == [dict(layer=3, axis="all", frames=[], cells=[], kept=[])] and death.tolist() == [3] * 16


def test_groups_are_per_video_and_follow_the_pre_llm_plan():
    """Two videos of 2 frames: four frame groups. After TTM a frame holds fewer tokens; a
    group leaves the trace once none of its tokens is alive."""
    token_map = grid(2, 4, videos=2)
    _, trace = prefill(VAS(ratio=0.3, interval=1, start_layer=0, end_layer=2), token_map,
                       lambda k: torch.ones(16), 4)
    assert trace[0]["frames"] == [0, 1, 2] and trace[0]["kept"] == list(range(12))
    # one video whose frame 1 kept cells 2 and 3 only (TTM); the cell sums tie, so cells 2 and 3
    # leave (the last of the order), and frame 1 with them
    plan = KeptTokens(torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 1, 2, 3, 2, 3]), 4)
    token_map = TokenMap.build(20, [(3, 7)], [plan])
    _, trace = prefill(VAS(ratio=0.6, interval=1, start_layer=0, end_layer=2, axis="cells"), token_map,
                       lambda k: torch.tensor([1.0, 1, 1, 1, 0, 0]), 4)
    assert trace == [dict(layer=2, axis="cells", frames=[0], cells=[0, 1], kept=[0, 1])]


def test_settings_and_their_errors():
    vas = parse_config({"tokenzoom": {"methods": {"vas": {"ratio": 0.4, "coefficients": [1, -2, 1]}}}}).vas
    assert vas.coefficients == (1, -2, 1) and vas.end_layer is None
    assert vas.for_model(24).end_layer == 19 and vas.for_model(28).end_layer == 23
    assert [a.layer for a in vas.for_model(24).score_requests()] == list(range(2, 20))
    assert {a.queries.name for a in vas.for_model(24).score_requests()} == {"TEXT_AFTER_VIDEO"}
    with pytest.raises(TokenZoomConfigError, match=r"end_layer \(unset: last layer index - 4 = -1\) = -1 is out of "
                                                   r"range for this model; allowed: start_layer \+ 2 = 4 <= end_layer <= 2"):
        VAS().for_model(4)
    with pytest.raises(TokenZoomConfigError, match=r"end_layer = 1 is out of range; allowed: end_layer >= start_layer"):
        VAS(start_layer=0, end_layer=1)
    with pytest.raises(TokenZoomConfigError, match=r"ratio = 0 is out of range"):
        VAS(ratio=0)
    with pytest.raises(TokenZoomConfigError, match=r"coefficients = \[1.0\] has the wrong length"):
        VAS(coefficients=(1.0,))
    with pytest.raises(TokenZoomConfigError, match=r"axis = 'time' is not known; allowed: 'auto', 'frames', 'cells'"):
        VAS(axis="time")
    with pytest.raises(TokenZoomConfigError, match=r"tokenzoom.methods.vas.end_layer = 3 is out of range for this "
                                                   r"model; allowed: start_layer \+ 2 = 2 <= end_layer <= 2"):
        parse_config({"tokenzoom": {"methods": {"vas": {"start_layer": 0, "end_layer": 3}}}}).for_model(4)
