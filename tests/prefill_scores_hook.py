"""Test hook (imported by the offline child before its engine starts): every session gets a
probe prefill policy that asks, at layers 0 and 2, for the attention the text queries (the
prompt after the video) give each visual token, and drops nothing; ``report()`` returns the
scores per request, averaged over those queries (the kernels hand back their sum)."""
from dataclasses import dataclass

from vllm_tokenzoom.methods.base import PrefillPolicy, Queries, ScoreRequest
from vllm_tokenzoom.v1.worker import sessions

LAYERS = (0, 2)
_SCORES: dict[str, dict[int, list[float]]] = {}


@dataclass(frozen=True)
class Probe(PrefillPolicy):
    def score_requests(self):
        return tuple(ScoreRequest(layer, Queries.TEXT_AFTER_VIDEO) for layer in LAYERS)

    def decide(self, layer, scores, state):
        return None, state


_original_new = sessions.new_session


def new_session(req_id, state, config, num_layers, encoder_cache):
    session = _original_new(req_id, state, config, num_layers, encoder_cache)
    if session is not None:
        session.prefill = {**session.prefill, "probe": Probe()}
    return session


_original_decide = sessions.RequestSession.decide


def decide(self, name, layer, position, scores):
    changed = _original_decide(self, name, layer, position, scores)
    if name == "probe":
        num_text = self.num_prompt_tokens - self.token_map.first_text_position
        _SCORES.setdefault(self.req_id, {})[layer] = (scores / num_text).tolist()
    return changed


sessions.new_session = new_session
sessions.RequestSession.decide = decide


def report():
    return _SCORES
