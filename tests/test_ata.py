"""ZoomVLM's ATA (methods-spec §2.2, §2.4.8-10), checked against hand-derived adjustments."""
import pytest
import torch

from vllm_tokenzoom.config import parse_config
from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.methods.ata import ATA, adjust, sentence_end_ids


def run_adjust(mean, counts, copies, drops):
    new, copied, deleted = adjust(torch.tensor(mean), torch.tensor(counts, dtype=torch.int32), copies, drops)
    return new.tolist(), copied, deleted


def test_most_attended_gain_a_copy_least_attended_go():
    # order (score desc, index asc): 1, 3 (tied at 0.5), 2, 0, 4
    assert run_adjust([0.1, 0.5, 0.3, 0.5, 0.0], [1] * 5, 2, 2) == ([0, 2, 1, 2, 0], [1, 3], [0, 4])


def test_scores_are_per_copy():
    # per-copy w = [0.3, 0.4, 0.1, 0.2, 0.05, 0.3]: entries 1 | 0 0 | 5 | 3 | 2 | 4
    assert run_adjust([0.6, 0.4, 0.1, 0.2, 0.05, 0.3], [2, 1, 1, 1, 1, 1], 2, 1) == (
        [3, 2, 1, 1, 0, 1], [0, 1], [4])


def test_all_copies_of_a_token_can_be_chosen_at_once():
    # w = [0.5, 0.1, 0.2, 0.3]: token 0's two entries are the first two
    assert run_adjust([1.0, 0.1, 0.2, 0.3], [2, 1, 1, 1], 2, 1) == ([4, 0, 1, 1], [0, 0], [1])
    # token 1's three entries are the last three: two of them go
    assert run_adjust([0.9, 0.0], [1, 3], 1, 2) == ([2, 1], [0], [1, 1])


def test_deleted_tokens_are_not_entries():
    # token 1 is gone (c = 0): never copied, never deleted again, whatever its score
    assert run_adjust([0.1, 0.9, 0.2, 0.3], [1, 0, 1, 1], 1, 1) == ([0, 0, 1, 2], [3], [0])


def test_too_few_entries_skip_the_adjustment():
    counts = torch.tensor([1, 0, 1], dtype=torch.int32)
    new, copied, deleted = adjust(torch.tensor([0.1, 0.2, 0.3]), counts, 1, 2)
    assert new is counts and copied is None and deleted is None


def test_adjusts_at_every_third_sentence_end_from_the_sampling_forward():
    ata = ATA(first_score_layer=0, last_score_layer=1, every=3, copies=1, drops=1, sentence_end_ids=(7, 8))
    scores = torch.tensor([0.2, 0.6, 0.0, 0.4])  # summed over the 2 score layers
    value, state = ata.step(scores, None, 5)
    assert value is None and state.sentences == 0
    values = []
    for token in (7, 1, 8, 7):  # sentence ends #1, -, #2, #3: adjust at the last
        value, state = ata.step(scores, state, token)
        values.append(value)
    assert values[:3] == [None] * 3
    assert values[3].tolist() == [1.0, 2.0, 0.0, 1.0] and state.sentences == 3
    assert state.adjusted == ([1], [2])
    assert ata.describe(9, values[3], state) == (9, [1], [2])
    same, state = ata.step(scores, state, 1)  # no sentence end: the same object (compact history)
    assert same is values[3] and state.adjusted is None and ata.describe(10, same, state) is None
    for token in (7, 7):
        same, state = ata.step(scores, state, token)
        assert same is values[3]
    # the 6th: scores are per copy (token 1: 0.3 / 2 < token 3's 0.2; entries 3 | 1 1 | 0) and index 2 is gone
    value, state = ata.step(scores, state, 8)
    assert value.tolist() == [0.0, 2.0, 0.0, 2.0] and state.adjusted == ([3], [0])


def test_sentence_ends_of_a_tokenizer():
    class Tokenizer:
        vocab = ["a", ".", " end.", "!", "?\n", ",", '."', ".)", "e.g.", "<|im_end|>", "'"]
        all_special_ids = [9]

        def __len__(self):
            return len(self.vocab)

        def decode(self, ids):
            return "".join(self.vocab[i] for i in ids)

    assert sentence_end_ids(Tokenizer()) == (1, 2, 3, 4, 6, 7, 8)


def test_layer_set_defaults_and_checks():
    assert ATA().for_model(24).score_layers == range(10, 24)  # 10-25 clipped to the model (methods-spec §2.4.6)
    assert ATA().for_model(28).score_layers == range(10, 26)
    with pytest.raises(TokenZoomConfigError, match=r"first_score_layer = 10 is out of range for this model.*< 4"):
        ATA().for_model(4)
    with pytest.raises(TokenZoomConfigError, match="last_score_layer = 30 is out of range for this model"):
        ATA(last_score_layer=30).for_model(24)
    with pytest.raises(TokenZoomConfigError, match=r"tokenzoom.methods.ata.copies = -1 is out of range"):
        parse_config({"tokenzoom": {"methods": {"ata": {"copies": -1}}}})
    with pytest.raises(TokenZoomConfigError, match=r"tokenzoom.methods.ata.every = 0 is out of range"):
        parse_config({"tokenzoom": {"methods": {"ata": {"every": 0}}}})
    with pytest.raises(TokenZoomConfigError, match="sentence_end_ids = 'x' has the wrong type"):
        parse_config({"tokenzoom": {"methods": {"ata": {"sentence_end_ids": "x"}}}})
    config = parse_config({"tokenzoom": {"methods": {"ata": {"sentence_end_ids": [3, 4], "every": 1}}}})
    assert config.ata.sentence_end_ids == (3, 4) and not config.needs_tokenizer
    assert parse_config({"tokenzoom": {"methods": {"ata": {}}}}).needs_tokenizer


def test_ata_asks_for_the_sampling_query_and_sync_scheduling():
    ata = ATA(first_score_layer=1, last_score_layer=3)
    assert [(a.layer, a.queries.name) for a in ata.score_requests()] == [(1, "NEXT_TOKEN"), (2, "NEXT_TOKEN"),
                                                                        (3, "NEXT_TOKEN")]
    assert ata.first_layer == 0 and ata.permanent and ata.after_sampling
    assert ata.requirements.sync_scheduling and ata.requirements.prefix_caching_off
