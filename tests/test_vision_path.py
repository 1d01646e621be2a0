"""The vision path around the pre-LLM stage: its output kept between a request's passes
(``models/tower_memo.py``: a hit is exactly what the tower would compute again, the memo never
holds more than its bound, a second pass takes what the first kept), and the stage's small host
ops in one thread."""
import torch

from vllm_tokenzoom.models.tower_memo import TowerMemo, key_of


def test_the_key_is_the_pixels_and_the_frames_encoded():
    video = torch.rand(6, 3, 8, 8)
    assert key_of(video, [0, 2]) == key_of(video.clone(), [0, 2])
    assert key_of(video, [0, 2]) != key_of(video, [0, 3])  # other frames encoded
    assert key_of(video, None) != key_of(video, list(range(6)))  # same pixels, said differently: not merged
    other = video.clone()
    other[2, 1, 4, 4] += 1e-6  # one value of an encoded frame
    assert key_of(video, [0, 2]) != key_of(other, [0, 2])
    # a frame not encoded does not change what the tower computes
    other = video.clone()
    other[5] = 0
    assert key_of(video, [0, 2]) == key_of(other, [0, 2])
    assert key_of(video.double(), None) != key_of(video, None)


def test_a_second_pass_takes_what_the_first_kept():
    memo, features = TowerMemo(), torch.rand(23, 4)
    memo.keep("a", features)
    assert torch.equal(memo.take("a"), features)
    assert memo.take("a") is None and memo.bytes == 0  # taken: freed


def test_the_memo_drops_its_oldest_entries_beyond_its_bound():
    size = 10 * 4 * 4  # a [10, 4] float32
    memo = TowerMemo(max_bytes=2 * size)
    for key in "abc":
        memo.keep(key, torch.rand(10, 4))
    assert list(memo.entries) == ["b", "c"] and memo.bytes == 2 * size
    memo.keep("b", torch.rand(10, 4))  # kept again: the newest
    memo.keep("d", torch.rand(10, 4))
    assert list(memo.entries) == ["b", "d"] and memo.bytes == 2 * size
    memo.keep("huge", torch.rand(100, 4))  # over the bound alone: not kept, nothing evicted for it
    assert list(memo.entries) == ["b", "d"]


def test_a_pre_llm_policy_runs_in_one_host_thread_and_the_count_comes_back():
    """The pre-LLM stage's small CPU ops run in one thread (shared cores make every parallel
    region wait for a descheduled sibling); the engine's thread count is restored, also on error."""
    import pytest

    from vllm_tokenzoom.models.llava_onevision import _one_host_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _one_host_thread(torch.zeros(1)):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), _one_host_thread(torch.zeros(1)):
            raise RuntimeError("policy failed")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
