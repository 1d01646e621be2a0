"""Test hook (imported by the offline child before its engine starts): every session asks
for the text queries' attention on the visual tokens at layers 0 and 2 during prefill, as
an in-LLM prefill method (FastV, VAS) will; ``report()`` returns them per request."""
from vllm_tokenzoom.v1.worker import sessions

LAYERS = frozenset({0, 2})
_SCORES: dict[str, dict[int, list[float]]] = {}
_original_post_init = sessions.RequestSession.__post_init__


def __post_init__(self):
    _original_post_init(self)
    self.prefill_score_layers = LAYERS


_original_record = sessions.RequestSession.record_prefill_scores


def record_prefill_scores(self, layer, mass, keys, seq_len):
    _original_record(self, layer, mass, keys, seq_len)
    _SCORES.setdefault(self.req_id, {})[layer] = self.visual_scores_from_text(layer).tolist()


sessions.RequestSession.__post_init__ = __post_init__
sessions.RequestSession.record_prefill_scores = record_prefill_scores


def report():
    return _SCORES
