"""What every policy declares: its stage, the scores it needs, its engine requirements.

A method is a frozen dataclass (its fields are its settings) subclassing one stage base:
- :class:`PreLLMPolicy`: before the LLM, on the projector output of each video (TTM, baselines);
- :class:`PrefillPolicy`: inside the LLM during prefill, gives visual tokens a *death layer*:
  their rows leave the batch after that layer (FastV, VAS);
- :class:`DecodePolicy`: between decode steps, sets multiplicities of visual tokens for the
  layers it covers (DyCoke's ``dp``, ZoomVLM's ``ata``);
- ``Stage.REQUEST``: around the request (ZoomVLM's ``voa``: two passes of the LLM, run by
  ``v1/engine/voa.py``; the policy is a pre-LLM policy of each pass, and its first pass has a
  decode-stage probe).
The request session (``v1/worker/sessions.py``) owns the plumbing and knows no method:
it routes the scores a policy asks for (:class:`ScoreRequest`) to its ``decide``, and
composes what the policies decide into the token view (``kv/view.py``).

Index space of ``scores`` and decisions: the *visual index* ``v``, the v-th visual token of
the prompt (after the pre-LLM stage), in token-position order (``kv/token_map.py``).
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vllm_tokenzoom.errors import TokenZoomConfigError


class Stage(enum.Enum):
    PRE_LLM = "before the LLM"
    PREFILL = "inside the LLM, during prefill"
    DECODE = "between decode steps"
    REQUEST = "around the request"


class Queries(enum.Enum):
    """Whose attention a score is: the head-mean attention these queries give each visual token."""

    LAST_PROMPT = "the last prompt token"
    TEXT_AFTER_VIDEO = "every prompt token after the last video"
    DECODE = "the query of the current decode step"
    # the query whose forward samples the next token: the last prompt token in the prefill,
    # then each decode step's (a recomputation after preemption: its last query)
    NEXT_TOKEN = "the query that samples the next token"


@dataclass(frozen=True)
class ScoreRequest:
    """At ``layer``, the attention of ``queries`` over the request's keys, mean over query heads (fp32)."""

    layer: int
    queries: Queries


# KV-cache dtypes whose bytes tokenzoom's kernels read as they are (no quantisation scales)
PLAIN_KV_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Requirements:
    """What the engine must provide for a policy; ``create_engine_config`` checks the union
    of the configured policies' requirements (``patches.py``)."""

    prefix_caching_off: bool = False  # blocks computed under a pruned view do not match their hashes
    one_step_prefill: bool = False  # the video and the text after it in one forward (no chunked prefill)
    attention_backend: bool = False  # tokenzoom's attention backend reads the token view
    kv_cache_dtypes: tuple[str, ...] | None = None  # None: any
    no_speculative_decoding: bool = False
    no_pipeline_parallel: bool = False
    no_micro_batching: bool = False  # DBO splits a step's metadata per micro-batch: rows no longer name requests
    sync_scheduling: bool = False  # a decision needs the token sampled by the step before, on the host
    no_mm_processor_cache: bool = False  # the engine needs each request's processed video (VOA's second pass)

    def __or__(self, other: "Requirements") -> "Requirements":
        dtypes = [d for d in (self.kv_cache_dtypes, other.kv_cache_dtypes) if d is not None]
        merged = {f.name: getattr(self, f.name) or getattr(other, f.name) for f in dataclasses.fields(self)}
        merged["kv_cache_dtypes"] = tuple(x for x in dtypes[0] if all(x in d for d in dtypes)) if dtypes else None
        return Requirements(**merged)


# what a method that reads or reshapes the KV cache inside the LLM needs
IN_LLM = Requirements(prefix_caching_off=True, attention_backend=True, kv_cache_dtypes=PLAIN_KV_DTYPES,
                      no_speculative_decoding=True, no_pipeline_parallel=True, no_micro_batching=True)


class Policy:
    """Base of every method's settings dataclass."""

    stage: ClassVar[Stage]
    requirements: ClassVar[Requirements] = Requirements()

    def check_model(self, num_layers: int) -> None:
        """Raise :class:`TokenZoomConfigError` when a setting does not fit a model of ``num_layers`` layers."""

    def for_model(self, num_layers: int, tokenizer=None) -> "Policy":
        """The policy with its model-dependent defaults filled in (checked with :meth:`check_model`);
        ``tokenizer``: the model's, where a default comes from it (the worker passes it)."""
        self.check_model(num_layers)
        return self

    def needs_tokenizer(self) -> bool:
        """Whether :meth:`for_model` must be given the tokenizer to fill in a default."""
        return False

    def score_requests(self) -> tuple[ScoreRequest, ...]:
        return ()

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PreLLMPolicy(Policy):
    """Prunes or pools each video's tokens before the LLM. ``num_kept_tokens`` is a function of
    counts only (the prompt is sized before any pixel is seen); ``apply`` keeps exactly that many."""

    stage = Stage.PRE_LLM

    def num_kept_tokens(self, num_frames: int, tokens_per_frame: int) -> int:
        raise NotImplementedError

    def frames_used(self, num_frames: int) -> list[int] | None:
        """The frames ``apply`` reads (the vision tower runs on these only); None: all."""
        return None

    def tower_reuse(self) -> str | None:
        """``"keep"``: a later pass of the request reads the same frames, so the vision path's
        output is kept for it; ``"take"``: this pass reads what an earlier one kept; None."""
        return None

    def apply(self, frames: torch.Tensor) -> tuple[torch.Tensor, "KeptTokens"]:
        """frames: [T, N, D] -> (kept tokens [K, D], where each came from). Frames outside
        ``frames_used`` hold zeros."""
        raise NotImplementedError


@dataclass(frozen=True)
class KeptTokens:
    """What reached the LLM of one video: each kept token's frame, and its *cell* among the
    ``cells`` of that frame (row-major; 14 x 14 = 196 for LLaVA-OneVision, g x g after spatial pooling)."""

    frame: torch.Tensor  # [K] int64
    cell: torch.Tensor  # [K] int64
    cells: int
    pooled: int = 0  # VOA: a frame's first ``pooled`` cells are its overview grid, the rest its full grid

    @classmethod
    def from_source(cls, source: torch.Tensor, cells: int) -> "KeptTokens":
        """source: [K] *source indices* ``frame * cells + cell`` into the video's unpruned tokens."""
        return cls(source // cells, source % cells, cells)

    @classmethod
    def every(cls, num_frames: int, cells: int, device=None) -> "KeptTokens":
        return cls.from_source(torch.arange(num_frames * cells, device=device), cells)

    @property
    def source(self) -> torch.Tensor:
        """[K] source indices ``frame * cells + cell``."""
        return self.frame * self.cells + self.cell

    def __len__(self) -> int:
        return self.frame.numel()


class PrefillPolicy(Policy):
    """Decides during prefill, from the scores it requested, which visual tokens leave the
    batch after the current layer (their death layer); never revives. Decisions are stored
    by the session, so a request recomputed after preemption is never re-decided."""

    stage = Stage.PREFILL
    requirements = IN_LLM | Requirements(one_step_prefill=True)

    def start(self, token_map) -> Any:
        """The state a request starts its prefill with (``kv/token_map.TokenMap``: each visual
        token's video, frame and cell)."""
        return None

    def decide(self, layer: int, scores: torch.Tensor, state: Any) -> tuple[torch.Tensor | None, Any]:
        """scores: [V] fp32 at ``layer`` (0 for tokens already dropped); state: what this policy
        carried from earlier layers of this prefill (:meth:`start` at first).
        -> (a [V] bool mask of the tokens whose rows leave after ``layer``, or None; the next state)."""
        raise NotImplementedError

    def describe(self, layer: int, dropped: torch.Tensor, state: Any) -> Any:
        """The trace entry of a drop at ``layer`` (``state``: after it): the layer and the
        visual indices still alive."""
        return layer, (~dropped).nonzero().flatten().tolist()


class DecodePolicy(Policy):
    """Between decode steps: from the scores of the current query, the multiplicity each visual
    token gets from layer ``first_layer`` on (0 skips it, 1 reads it, k counts it k times), in
    force from the current query on. The view composes every policy's by product.

    A policy that decides ``after_sampling`` gets its scores summed over its score layers and
    the token that forward sampled; its multiplicities are in force from the next query on
    (ZoomVLM's ATA acts on sentence ends). The forward keeps its queries at the score layers and
    the attention over them is computed after sampling, only if :meth:`wants_scores` says so.
    A ``permanent`` policy never revives a 0: blocks whose tokens it zeroed in every layer go
    back to vLLM's pool while the request runs."""

    stage = Stage.DECODE
    requirements = IN_LLM
    key_copy = False  # on CPU, copy the visual tokens' K token-major for the layers it covers (``dp``)
    after_sampling: ClassVar[bool] = False
    permanent: ClassVar[bool] = False
    reports: ClassVar[bool] = False  # has a result for the caller: decides right after sampling (``result``)

    @property
    def first_layer(self) -> int:
        raise NotImplementedError

    def start(self, token_map) -> Any:
        """The state before the first step (``kv/token_map.TokenMap``: each visual token's video,
        frame and cell; complete by then)."""
        return None

    def wants_scores(self, state: Any, token: int) -> bool:
        """An ``after_sampling`` policy: whether ``step(scores, state, token)`` reads ``scores``
        for this sampled ``token``; if not, it gets None and no attention is computed for it."""
        return True

    def result(self, state: Any) -> Any:
        """What the engine hands back to the caller with the request's output once it is not
        None (``RequestOutput.kv_transfer_params["tokenzoom"][name]``; VOA's keyframes)."""
        return None

    def step(self, scores: torch.Tensor, state: Any) -> tuple[torch.Tensor | None, Any]:
        """scores: [V] fp32 of the current decode query; state: carried from the previous step
        (None at first). -> (multiplicity [V]: integer counts as uint8, or float32; None for all
        ones; the next state). The session keeps every distinct value (compact history): the
        smaller the dtype, the less a request holds.
        Returning the same tensor object as the step before means "unchanged" (compact history).
        An ``after_sampling`` policy is called as ``step(scores, state, token)``."""
        raise NotImplementedError

    def describe(self, position: int, value: torch.Tensor | None, state: Any) -> Any:
        """The trace entry of a decision in force from ``position``: the position and the visual
        indices read (None: all)."""
        return position, None if value is None or bool((value == 1).all()) else value.nonzero().flatten().tolist()


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[V] scores -> [V] bool marking the k largest, ties to the earlier index: the first k of
    the order (score desc, index asc), as a stable argsort gives, from ``topk`` and a running
    count of the ties at the boundary (several times faster than a stable sort on CPU; no
    host synchronisation)."""
    n = scores.numel()
    if k <= 0 or k >= n:
        return torch.full_like(scores, k > 0, dtype=torch.bool)
    boundary = torch.topk(scores, k).values[-1]
    above = scores > boundary
    tied = scores == boundary
    return above | (tied & (torch.cumsum(tied, 0) <= k - above.sum()))


def check_ratio(name: str, value: float, low: float = 0.0, high: float = 1.0, high_open: bool = True) -> None:
    """``low <= value < high`` (or ``<= high``), else the error the config parser shows."""
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        op = "<" if high_open else "<="
        raise TokenZoomConfigError(f"{name} = {value!r} is out of range; allowed: {low} <= {name} {op} {high}")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise TokenZoomConfigError(f"{name} = {value!r} is not known; allowed: {', '.join(map(repr, allowed))}")
