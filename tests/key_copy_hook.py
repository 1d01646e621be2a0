"""Test hook (imported by the offline child before its engine starts): records, per request,
the layers at which a session made a key copy and how many copies it made (``report()``)."""
from vllm_tokenzoom.v1.worker import sessions

_MADE: dict[str, list[int]] = {}  # req_id -> layer of each copy made, in order
_original = sessions.RequestSession.key_copy


def key_copy(self, layer, segment, k_region, k_offsets, block_row):
    had = layer in self.key_copies
    copy = _original(self, layer, segment, k_region, k_offsets, block_row)
    if not had:
        _MADE.setdefault(self.req_id, []).append(layer)
    return copy


sessions.RequestSession.key_copy = key_copy


def report():
    return _MADE
