"""Test hook (imported by the offline child before its engine starts): the k-th request with a
video gets the in-LLM policies of ``MIX[k % len(MIX)]`` only, each a tokenzoom ``methods``
object (``{}``: none: a plain request). ``MIX`` is the JSON list in ``TOKENZOOM_TEST_MIX``.
So one batch mixes requests whose rows drop during prefill (by different methods), requests
that read a pruned view during decode, requests that do both, and plain ones (per-request
settings through the API are issue #13; this exercises the worker side). The engine's
config must enable some in-LLM method, so that the worker makes sessions at all."""
import json
import os

from vllm_tokenzoom.config import parse_config
from vllm_tokenzoom.methods.base import Stage
from vllm_tokenzoom.v1.worker import sessions

MIX = json.loads(os.environ["TOKENZOOM_TEST_MIX"])
_count = [0]
_original_new = sessions.new_session


def new_session(req_id, state, config, num_layers, encoder_cache):
    session = _original_new(req_id, state, config, num_layers, encoder_cache)
    if session is None:
        return None
    methods = MIX[_count[0] % len(MIX)]
    _count[0] += 1
    if not methods:
        return None
    mine = parse_config({"tokenzoom": {"methods": methods}}).for_model(num_layers)
    return sessions.RequestSession(req_id, session.token_map, num_layers, mine.stage(Stage.PREFILL),
                                   mine.stage(Stage.DECODE), plans=session.plans)


sessions.new_session = new_session
