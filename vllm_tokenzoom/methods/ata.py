"""ZoomVLM's Adaptive Token Adjustment (ATA): ZoomVLM §4.3 (Eqs. 10-13), App. E Alg. 1;
resolved in research/methods-spec.md §2.2, §2.4.8-10.

At an adjustment step, the attention the current query gives each visual token, averaged
over a layer set (OneVision: 0-based layers 10-25, clipped to the model) and over heads, is
split evenly over the token's copies (its multiplicity ``c``): ``w = mean / c`` per *entry*.
Entries are ordered by (w desc, visual index asc, copy asc); the first ``copies`` entries
gain one copy each (``c += 1``: exactly attending a duplicated token, a ``log c`` logit bias)
and the last ``drops`` entries are deleted (``c -= 1``; at 0 the token is gone for good).
Adjustments happen at sentence ends: after every ``every``-th sampled token that ends a
sentence (a token whose text, trailing whitespace, quotes and brackets stripped, ends with
``.``, ``!`` or ``?``), from the scores of the forward that sampled it, in force from the next
forward on, in every layer. Positions never shift (methods-spec §0).

Index space: ``scores`` and the multiplicity are over *visual indices*.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch

from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.methods.base import IN_LLM, DecodePolicy, Queries, Requirements, ScoreRequest

# ZoomVLM §5.1: layers "10-25" for LLaVA-OneVision (0-based, inclusive; methods-spec §2.4.6)
DEFAULT_LAYERS = (10, 25)
_CLOSERS = "\"'”’)]}»"


def score_layer_range(first: int, last: int | None, num_layers: int) -> tuple[int, int]:
    """ZoomVLM's layer set [first, last] for a model of ``num_layers``, checked; ``last`` unset:
    25 or the model's last layer, whichever is lower (ATA's and VOA's)."""
    if first >= num_layers or (last is not None and last >= num_layers):
        what, value = ("first_score_layer", first) if first >= num_layers else ("last_score_layer", last)
        raise TokenZoomConfigError(f"{what} = {value} is out of range for this model; allowed: 0 <= "
                                   f"first_score_layer <= last_score_layer < {num_layers} (its number of decoder layers)")
    return first, last if last is not None else min(DEFAULT_LAYERS[1], num_layers - 1)


def sentence_end_ids(tokenizer) -> tuple[int, ...]:
    """The token ids whose decoded text ends a sentence (methods-spec §2.4.9), once per tokenizer."""
    special = set(tokenizer.all_special_ids)
    out = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i]).rstrip().rstrip(_CLOSERS).rstrip()
        if text.endswith((".", "!", "?")):
            out.append(i)
    return tuple(out)


@dataclass(frozen=True)
class ATAState:
    counts: torch.Tensor  # [V] int32, each visual token's multiplicity c (0: deleted for good)
    value: torch.Tensor | None  # [V] float32 the counts as the view reads them (None: all ones)
    sentences: int = 0  # sentence ends sampled so far
    adjusted: tuple | None = None  # this step's adjustment: (visual indices copied, deleted), with repeats


@dataclass(frozen=True)
class ATA(DecodePolicy):
    """Settings of ZoomVLM's adaptive token adjustment.

    Parameters
    ----------
    first_score_layer, last_score_layer : int
        The layer set whose attention is averaged (0-based, inclusive). ``last_score_layer``
        unset: 25 or the model's last layer, whichever is lower.
    every : int
        Adjust at every ``every``-th sentence end (ZoomVLM: every 3 sentences).
    copies, drops : int
        m: the entries that gain a copy, and the entries deleted, per adjustment (ZoomVLM: 10
        each; its Table 14 drops twice as many as it copies). An adjustment is skipped when
        the video has fewer than ``copies + drops`` entries left.
    sentence_end_ids : list of int
        The tokens that end a sentence; unset: computed from the model's tokenizer.
    sentences : int
        Sentence ends already in the context when decoding starts (VOA's second pass: those
        of its first pass's tokens; methods-spec §2.4.9). Set by the engine.
    """

    first_score_layer: int = DEFAULT_LAYERS[0]
    last_score_layer: int | None = None
    every: int = 3
    copies: int = 10
    drops: int = 10
    sentence_end_ids: tuple[int, ...] | None = field(default=None, repr=False)
    sentences: int = 0

    after_sampling = True
    permanent = True
    # the token a step sampled must be on the host when the next step starts
    requirements = IN_LLM | Requirements(sync_scheduling=True)

    def __post_init__(self):
        for name in ("every", "copies", "drops", "first_score_layer", "sentences"):
            low = 1 if name == "every" else 0
            if getattr(self, name) < low:
                raise TokenZoomConfigError(f"{name} = {getattr(self, name)!r} is out of range; allowed: {name} >= {low}")
        if self.last_score_layer is not None and self.last_score_layer < self.first_score_layer:
            raise TokenZoomConfigError(f"last_score_layer = {self.last_score_layer} is out of range; allowed: "
                                       f"last_score_layer >= first_score_layer ({self.first_score_layer})")

    def check_model(self, num_layers: int) -> None:
        score_layer_range(self.first_score_layer, self.last_score_layer, num_layers)

    def for_model(self, num_layers: int, tokenizer=None) -> "ATA":
        _, last = score_layer_range(self.first_score_layer, self.last_score_layer, num_layers)
        ends = self.sentence_end_ids
        if ends is None and tokenizer is not None:
            ends = sentence_end_ids(tokenizer)
        return dataclasses.replace(self, last_score_layer=last, sentence_end_ids=ends)

    def needs_tokenizer(self) -> bool:
        return self.sentence_end_ids is None

    @property
    def first_layer(self) -> int:
        return 0  # every layer (methods-spec §2.4.10)

    @property
    def score_layers(self) -> range:
        if self.last_score_layer is None:
            raise ValueError("ATA.score_layers needs last_score_layer: resolve the policy with for_model(num_layers)")
        return range(self.first_score_layer, self.last_score_layer + 1)

    def score_requests(self) -> tuple[ScoreRequest, ...]:
        return tuple(ScoreRequest(layer, Queries.NEXT_TOKEN) for layer in self.score_layers)

    def start(self, token_map) -> ATAState:
        return ATAState(torch.ones(token_map.num_visual, dtype=torch.int32), None, self.sentences)

    def wants_scores(self, state: ATAState, token: int) -> bool:
        """Only an adjustment step reads the attention: ``token`` ends the ``every``-th sentence."""
        if self.sentence_end_ids is None:
            raise ValueError("ATA needs sentence_end_ids: resolve the policy with for_model(num_layers, tokenizer)")
        sentences = self.sentences if state is None else state.sentences
        return token in self._ends and (sentences + 1) % self.every == 0

    def step(self, scores: torch.Tensor | None, state: ATAState | None, token: int) -> tuple[torch.Tensor | None, ATAState]:
        """scores: [V] fp32, the sampling forward's attention summed over the score layers (head
        mean; None when :meth:`wants_scores` said no); token: what it sampled. -> (multiplicity
        [V] float32 in force from the next query, or None for all ones; the next state). The same
        value object when nothing changed. ``state`` None: as :meth:`start` (from ``scores``'s size)."""
        if state is None:
            state = ATAState(torch.ones(scores.numel(), dtype=torch.int32), None, self.sentences)
        if not self.wants_scores(state, token):
            return state.value, ATAState(state.counts, state.value, state.sentences + (token in self._ends))
        sentences = state.sentences + 1
        counts = state.counts.to(scores.device)
        counts, copied, deleted = adjust(scores.float() / len(self.score_layers), counts, self.copies, self.drops)
        if copied is None:  # too few entries left
            return state.value, ATAState(state.counts, state.value, sentences)
        value = counts.float()
        return value, ATAState(counts, value, sentences, (copied, deleted))

    @functools.cached_property
    def _ends(self) -> frozenset[int]:
        return frozenset(self.sentence_end_ids or ())

    def describe(self, position: int, value, state: ATAState):
        """An adjustment in force from ``position``: (position, visual indices copied, deleted);
        None for a step without one."""
        return None if state.adjusted is None else (position, *state.adjusted)


def adjust(mean: torch.Tensor, counts: torch.Tensor, copies: int, drops: int):
    """methods-spec §2.4.8. mean: [V] layer- and head-mean attention; counts: [V] int32 c.
    -> (new counts, visual indices copied, deleted: sorted lists with repeats), or
    (counts, None, None) when fewer than ``copies + drops`` entries exist."""
    alive = (counts > 0).nonzero().flatten()  # [A] visual indices, ascending
    c = counts[alive].long()
    total = int(c.sum())
    if total < copies + drops:
        return counts, None, None
    w = mean[alive] / c  # per-copy score
    order = torch.argsort(-w, stable=True)  # (w desc, visual index asc); a token's copies are consecutive
    c = c[order]
    end = torch.cumsum(c, 0)  # each token's entries are [end - c, end)
    start = end - c
    gain = (torch.clamp(copies - start, min=0)).minimum(c)  # entries among the first `copies`
    loss = (end - torch.clamp(start, min=total - drops)).clamp(min=0).minimum(c)  # among the last `drops`
    new = counts.clone()
    index = alive[order]
    new[index] += (gain - loss).to(new.dtype)
    copied = torch.repeat_interleave(index, gain).sort().values.tolist()
    deleted = torch.repeat_interleave(index, loss).sort().values.tolist()
    return new, copied, deleted
