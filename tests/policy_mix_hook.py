"""Test hook (imported by the offline child before its engine starts): the engine's config
enables ``fastv`` and ``dp``; the k-th video request gets the policies of ``MIX[k % 3]``
only: FastV alone, DyCoke's dp alone, both. So one batch mixes requests whose rows drop
during prefill, requests that read a pruned view during decode, and requests that do both
(per-request settings through the API are issue #13; this exercises the worker side)."""
from vllm_tokenzoom.v1.worker import sessions

MIX = [("fastv",), ("dp",), ("fastv", "dp")]
_count = [0]
_original_new = sessions.new_session


def new_session(req_id, state, config, num_layers, encoder_cache):
    session = _original_new(req_id, state, config, num_layers, encoder_cache)
    if session is not None:
        names = MIX[_count[0] % len(MIX)]
        _count[0] += 1
        session.prefill = {k: v for k, v in session.prefill.items() if k in names}
        session.decode = {k: v for k, v in session.decode.items() if k in names}
    return session


sessions.new_session = new_session
