"""Test hook (imported by the offline child before its engine starts): records, for every
forward, how many hidden-state rows each decoder layer computed (``report()``: a list of
forwards, each a list of row counts per layer), by wrapping the decoder layers' class."""
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer

_FORWARDS: list[list[int]] = []
_original = Qwen2DecoderLayer.forward


def forward(self, positions, hidden_states, residual):
    index = int(self.self_attn.attn.layer_name.split(".")[-3])  # "...layers.{i}.self_attn.attn"
    if index == 0:
        _FORWARDS.append([])
    _FORWARDS[-1].append(hidden_states.shape[0])
    assert positions.shape[0] == hidden_states.shape[0]
    return _original(self, positions, hidden_states, residual)


Qwen2DecoderLayer.forward = forward


def report():
    return _FORWARDS
