"""ZoomVLM's video overview augmenter (methods-spec §2.1, §2.4.1-7): the overview's frames
and grid, the prompt sizes of both passes, what the keyframes add, and Eqs. 7-8's choice."""
import math

import pytest
import torch

from vllm_tokenzoom.config import PRESETS, parse_config
from vllm_tokenzoom.kv.token_map import TokenMap
from vllm_tokenzoom.methods import VOA
from vllm_tokenzoom.methods.base import KeptTokens
from vllm_tokenzoom.methods.voa import choose_keyframes


def test_overview_frames_follow_the_spec():
    """32 frames at r_t = 1.5: 22 frames, floor(i * 1.5) (App. D's 22, not Eq. 6's 21)."""
    assert VOA().overview_frames(32) == [0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 21, 22, 24, 25, 27, 28, 30, 31]
    assert VOA().overview_frames(16) == [0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15]
    assert VOA(frame_ratio=1.0).overview_frames(5) == [0, 1, 2, 3, 4]
    assert VOA(frame_ratio=2.0).overview_frames(5) == [0, 2, 4]


def test_prompt_sizes_of_both_passes():
    """methods-spec §2.6: 22 * 10^2 (+1 newline) = 2201 in the first pass, + 10 * 196 = 4161 in the second."""
    first, second = VOA(), VOA(chosen=tuple(range(0, 30, 3)))
    assert first.num_kept_tokens(32, 196) + 1 == 2201
    assert second.num_kept_tokens(32, 196) + 1 == 4161
    with pytest.raises(ValueError, match="chosen .* names a frame the video does not have"):
        VOA(chosen=(40,)).num_kept_tokens(32, 196)


def test_overview_pools_and_keyframes_are_the_frames_themselves():
    frames = torch.randn(7, 196, 5)  # [T, N, D]
    voa = VOA(grid=3, chosen=(1, 6))
    tokens, kept = voa.apply(frames)
    overview = voa.overview_frames(7)  # [0, 1, 3, 4, 6]
    assert tokens.shape == (len(overview) * 9 + 2 * 196, 5)
    # a frame that is one colour pools to that colour; bilinear pooling of a frame is a weighted mean
    flat = torch.ones(7, 196, 5) * torch.arange(7.0)[:, None, None]
    pooled, _ = VOA(grid=3).apply(flat)
    assert torch.allclose(pooled.view(len(overview), 9, 5), torch.tensor(overview, dtype=torch.float)[:, None, None]
                          .expand(-1, 9, 5))
    # the keyframes are their frames' full-resolution tokens, unchanged, in time order
    assert torch.equal(tokens[len(overview) * 9:], torch.cat((frames[1], frames[6])))
    # where each token came from: overview cells 0..8, then full-resolution cells 9..9+195
    assert kept.cells == 9 + 196
    assert kept.frame.tolist() == [f for f in overview for _ in range(9)] + [1] * 196 + [6] * 196
    assert kept.cell.tolist() == list(range(9)) * len(overview) + list(range(9, 9 + 196)) * 2


def test_keyframes_by_mean_attention_ties_to_the_earlier_frame():
    frame = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 3, 3])
    # frame 1 has the most attention in total (4 tokens) but not the most per token
    mean = torch.tensor([0.3, 0.3, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3, 0.1, 0.1])
    assert choose_keyframes(mean, frame, 2) == (0, 2)  # 0 and 2 tie at 0.3: both, ascending
    assert choose_keyframes(mean, frame, 1) == (0,)  # the tie goes to the earlier frame
    assert choose_keyframes(mean, frame, 10) == (0, 1, 2, 3)  # k beyond the frames: all of them


def test_the_probe_chooses_at_token_s_from_its_forward():
    voa = VOA(keyframes=1, probe_tokens=3, grid=2, first_score_layer=0, last_score_layer=1)
    probe = voa.probe()
    assert [a.layer for a in probe.score_requests()] == [0, 1]
    kept = KeptTokens(torch.tensor([0] * 4 + [3] * 4), torch.tensor([0, 1, 2, 3] * 2), 4 + 196)
    token_map = TokenMap.build(20, [(2, 9)], [kept])
    state = probe.start(token_map)
    favour = {0: torch.tensor([1.0] * 4 + [0.0] * 4), 3: torch.tensor([0.0] * 4 + [1.0] * 4)}
    for i, frame in enumerate((3, 3, 0, 3)):  # token #3's forward favours frame 0
        value, state = probe.step(favour[frame] * 2, state, token=7)
        assert value is None  # the first pass reads every token
        assert probe.result(state) == (None if i < 2 else {"keyframes": [0], "frame_tokens": 196})


def test_zoomvlm_preset_is_voa_then_ata():
    config = parse_config({"tokenzoom": {"preset": "zoomvlm"}}).for_model(28)
    assert set(PRESETS["zoomvlm"]) == {"voa", "ata"}
    voa = config.methods["voa"]
    assert (voa.frame_ratio, voa.grid, voa.keyframes, voa.probe_tokens) == (1.5, 10, 10, 20)
    assert (voa.first_score_layer, voa.last_score_layer) == (10, 25)
    assert list(config.decode) == ["voa"]  # the first pass: only the probe; ATA acts in the second
    second = parse_config({"tokenzoom": {"methods": {"voa": {"chosen": [0, 3]}, "ata": {}}}}).for_model(28)
    assert list(second.decode) == ["ata"] and second.pre_llm.chosen == (0, 3)
    assert math.isclose(config.methods["ata"].copies, 10)
