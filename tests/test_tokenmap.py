"""Token-map pictures (``python -m vllm_tokenzoom.tokenmap``): each token's fate, hand-derived
from a record, and records written by the worker for offline requests of every stage."""
import json

import numpy as np
import pytest

from vllm_tokenzoom import tokenmap
from vllm_tokenzoom.methods import TTM, FastV
from vllm_tokenzoom.testing.offline import run_offline

# one video of 3 frames of 2 x 2 cells; 7 tokens reached the LLM (frame 1 kept one, frame 2 two)
RECORD = {
    "request_id": "r", "num_layers": 4, "num_prompt_tokens": 20, "cells": [4], "methods": {"dp": {}, "ata": {}},
    "position": [3, 4, 5, 6, 7, 8, 9], "video": [0] * 7,
    "frame": [0, 0, 0, 0, 1, 2, 2], "cell": [0, 1, 2, 3, 1, 0, 3],
    "death": [3, 3, 1, 3, 0, 3, 3],  # token 2 left after layer 1, token 4 after layer 0
    "decisions": {"dp": [[20, [0, 1, 3]], [21, None]], "ata": [[21, [0, 0], [3]]]},
}


def test_states_from_a_record():
    (state,) = tokenmap.video_states(RECORD)
    assert state.reached.tolist() == [[True] * 4, [False, True, False, False], [True, False, False, True]]
    nan = np.nan
    np.testing.assert_array_equal(state.layers_held, [[1, 1, 0.5, 1], [nan, 0.25, nan, nan], [1, nan, nan, 1]])
    np.testing.assert_array_equal(state.dp_read, [[1, 1, 0.5, 1], [nan, 0.5, nan, nan], [0.5, nan, nan, 0.5]])
    np.testing.assert_array_equal(state.ata_count, [[3, 1, 1, 0], [nan, 1, nan, nan], [1, nan, nan, 1]])
    positions, timeline = tokenmap.decode_timeline(RECORD)
    assert positions == [20, 21]
    assert timeline.tolist() == [[1, 1, 0, 1, 0, 0, 0], [3, 1, 1, 0, 1, 1, 1]]  # dp's selection x ATA's counts


def test_colors_say_which_stage_did_what():
    (state,) = tokenmap.video_states(RECORD)
    prefill, decode = tokenmap.prefill_colors(state), tokenmap.decode_colors(state)
    assert prefill[1, 0].tolist() == tokenmap.GREY.tolist()  # dropped before the LLM
    assert prefill[0, 0].tolist() == [1, 1, 1]  # through every layer
    np.testing.assert_allclose(prefill[1, 1], 0.25 + 0.75 * tokenmap.ORANGE)  # left after layer 0 of 4
    assert decode[0, 3].tolist() == [0, 0, 0]  # deleted by ATA
    assert decode[0, 0][2] > decode[0, 0][0]  # copies: blue
    np.testing.assert_allclose(decode[2, 3], 0.5 + 0.5 * tokenmap.GREEN)  # dp read it at half the steps
    np.testing.assert_array_equal(decode[0, 2], prefill[0, 2])  # it left during prefill: shown so
    assert tokenmap.mosaic(prefill, per_row=2).shape == (2 * 3 - 1, 2 * 3 - 1, 3)


def test_a_record_that_does_not_place_its_tokens_is_refused():
    with pytest.raises(ValueError, match="video 0: the record does not say where its tokens came from"):
        tokenmap.video_states({**RECORD, "frame": [-1] * 7})


@pytest.mark.parametrize("methods", [
    {"ttm": {"prune_ratio": 0.7}},
    {"ttm": {"prune_ratio": 0.7}, "fastv": {"layer": 2, "prune_ratio": 0.5}, "dp": {"layer": 3},
     "ata": {"first_score_layer": 1, "every": 1, "sentence_end_ids": list(range(4096))}},
], ids=["pre-LLM only", "every stage"])
def test_offline_requests_leave_records_that_render(tiny_model, tmp_path, methods):
    request, config = dict(frames=8, seed=5, max_tokens=6), {"tokenzoom": {"methods": methods}}
    traced = run_offline(tiny_model, [request], config, env={"TOKENZOOM_TRACE_DIR": str(tmp_path)})
    assert traced["outputs"][0]["tokens"] == run_offline(tiny_model, [request], config)["outputs"][0]["tokens"]
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    kept = TTM(prune_ratio=0.7).num_kept_tokens(8, 196)
    assert len(record["position"]) == kept and set(record["methods"]) == set(methods) - {"ttm"}
    (state,) = tokenmap.video_states(record)
    assert state.reached.shape == (8, 196) and int(state.reached.sum()) == kept
    assert state.reached[0].all()  # TTM keeps each window's first frame whole
    if "fastv" in methods:  # FastV: after layer K-1 = 1, R of the visual tokens leave
        assert sorted(set(record["death"])) == [1, 3]
        assert record["death"].count(1) == kept - FastV(layer=2, prune_ratio=0.5).num_kept(kept)
        assert len(record["decisions"]["dp"]) == 5 and len(record["decisions"]["ata"]) == 5
    else:
        assert set(record["death"]) == {3}
    png = tmp_path / "map.png"
    tokenmap.main([str(path), "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_voa_record_draws_the_overview_and_the_keyframes_apart(tmp_path):
    """A VOA video's cells are its 2 x 2 overview grid, then its 3 x 3 full grid: two panels,
    the full grid grey but for the keyframe (frame 1)."""
    frames = [0, 0, 0, 0, 2, 2, 2, 2] + [1] * 9
    cells = [0, 1, 2, 3] * 2 + list(range(4, 13))
    record = {"request_id": "voa", "num_layers": 4, "num_prompt_tokens": 30, "cells": [13], "pooled_cells": [4],
              "methods": {}, "position": list(range(1, 18)), "video": [0] * 17, "frame": frames, "cell": cells,
              "death": [3] * 17, "decisions": {}}
    overview, full = tokenmap.video_states(record)
    assert overview.reached.shape == (3, 4) and full.reached.shape == (3, 9)
    assert overview.reached[[0, 2]].all() and not overview.reached[1].any()
    assert full.reached[1].all() and not full.reached[[0, 2]].any()
    assert tokenmap.render(record, tmp_path / "voa.png").stat().st_size > 0
