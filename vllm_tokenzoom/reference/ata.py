"""ZoomVLM's adaptive token adjustment (§4.3; methods-spec §2.7) as a dense reference hook
(``reference/attention.py``).

HF keeps every key; a visual token counted ``c`` times gets the logit bias ``log c`` in
every layer (``c = 0``: masked, for good). In each forward, the attention of its last query
(the one that samples the next token) over the visual tokens is summed over the policy's
layer set; once the token is sampled (:meth:`sampled`, from a stopping criterion of
``generate``), the same :class:`~vllm_tokenzoom.methods.ata.ATA` policy decides the counts
the next forward reads.
"""
from __future__ import annotations

import torch

from vllm_tokenzoom.methods.ata import ATA


class ATAReference:
    """``trace``: per adjustment, (the first query position reading it, visual indices copied,
    deleted)."""

    name = "ata"

    def __init__(self, ata: ATA, visual_positions: torch.Tensor):
        self.ata, self.visual = ata, visual_positions
        self.layers = set(ata.score_layers)
        self.state, self.value, self.scores = None, None, None
        self.trace: list[tuple] = []

    def hidden(self, layer, query_positions, kv_len):
        if self.value is None:
            return None
        hidden = torch.zeros(kv_len, dtype=torch.bool)
        hidden[self.visual[self.value == 0]] = True
        return hidden

    def bias(self, layer, query_positions, kv_len):
        if self.value is None:
            return None
        bias = torch.zeros(kv_len)
        bias[self.visual] = torch.log(self.value.clamp(min=1))
        return bias

    def observe(self, layer, probs, query_positions):
        if layer in self.layers:
            mass = probs[:, -1, :].mean(0)[self.visual]  # [V] the sampling query, head mean
            self.scores = mass if self.scores is None else self.scores + mass
            self.position = int(query_positions[-1])

    def sampled(self, token: int) -> None:
        """The forward whose scores were observed sampled ``token``."""
        self.value, self.state = self.ata.step(self.scores, self.state, token)
        entry = self.ata.describe(self.position + 1, self.value, self.state)
        if entry is not None:
            self.trace.append(entry)
        self.scores = None
