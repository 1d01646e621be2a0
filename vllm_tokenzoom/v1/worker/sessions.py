"""Worker-side tokenzoom state of each running request (decode-time methods).

A :class:`RequestSession` holds one request's token view and the state its decode-time
policy carries between steps. The model-runner hook (``patches.py``) publishes, before
each step's attention metadata is built, which session each batch row belongs to
(``current_rows``), creates sessions for new requests and drops those vLLM no longer
holds (finished, aborted). A preempted request keeps its session: when vLLM recomputes
it, each generated position gets back the view it had (``TokenView.at``).

On CPU a session also holds, per pruned layer, a token-major copy of its visual tokens' K
(``ops.KeyCopy``; DyCoke's ``key_copy`` setting): vLLM's CPU K layout makes a scattered keep
set as slow to read as the whole cache, the copy makes it cost what it keeps. Made at the
first decode step that prunes the layer, dropped with the session or when the request's
blocks are replaced (preemption: the KV is recomputed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from vllm_tokenzoom.kv.view import KVPlan, TokenView
from vllm_tokenzoom.methods.dp import DP, DPState
from vllm_tokenzoom.ops import KeyCopy, copy_keys, rows_of

SESSIONS: dict[str, "RequestSession"] = {}
_ROWS: list["RequestSession | None"] = []  # batch row -> session, this step


@dataclass
class RequestSession:
    req_id: str
    num_prompt_tokens: int
    visual_positions: torch.Tensor  # [V] int64 token positions of the request's visual tokens
    dp: DP
    view: TokenView = field(init=False)
    dp_state: DPState = field(default_factory=DPState)
    # per decode step: (position of the query, selection in force as visual indices or None)
    trace: list[tuple[int, list[int] | None]] = field(default_factory=list)
    reported_blocks: set[int] = field(default_factory=set)  # logical blocks handed back to the scheduler
    # layers at which a policy wants, during prefill, the attention mass each visual token
    # gets from the text queries (the prompt after the video), averaged over heads and queries
    prefill_score_layers: frozenset[int] = frozenset()
    prefill_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [V] running sum
    prefill_score_queries: dict[int, int] = field(default_factory=dict)  # layer -> text queries summed
    # the last multiplicities handed out: every layer of a group reads the same ones in a step
    _cached: tuple = field(default=(None, None), repr=False)
    key_copies: dict[int, KeyCopy] = field(default_factory=dict)  # layer -> K of the visual tokens
    block_ids: object = field(default=None, repr=False)  # vLLM's block ids object the copies were read from

    def __post_init__(self):
        self.view = TokenView((0, self.dp.layer))  # group 0: layers < L (full), group 1: layers >= L

    def undecided_query(self, layer: int, first_query: int, seq_len: int) -> int | None:
        """Row-local index of the query DyCoke must decide for at this layer, if any: the
        last query of the row when it is a generated position not decided yet. (A decode
        step; or the last query of a recomputation after preemption, whose earlier
        generated positions were decided before.)"""
        last = seq_len - 1
        if layer != self.dp.score_layer or last < self.num_prompt_tokens or last <= self.view.last_position:
            return None
        return last - first_query

    @property
    def first_text_position(self) -> int:
        return int(self.visual_positions[-1]) + 2  # past the last visual token and the video's newline

    def text_queries(self, layer: int, first_query: int, seq_len: int) -> torch.Tensor | None:
        """Row-local indices of this row's text queries whose scores a policy wants here."""
        if layer not in self.prefill_score_layers:
            return None
        lo, hi = max(first_query, self.first_text_position), min(seq_len, self.num_prompt_tokens)
        return torch.arange(lo, hi) - first_query if hi > lo else None

    def record_prefill_scores(self, layer: int, mass: torch.Tensor, keys: torch.Tensor, seq_len: int) -> None:
        """mass: [k, n] head-averaged attention of k text queries over the key positions ``keys``."""
        per_position = torch.zeros(seq_len)
        per_position[keys] = mass.float().sum(0)
        visual = per_position[self.visual_positions]
        self.prefill_scores[layer] = self.prefill_scores.get(layer, torch.zeros_like(visual)) + visual
        self.prefill_score_queries[layer] = self.prefill_score_queries.get(layer, 0) + mass.shape[0]

    def visual_scores_from_text(self, layer: int) -> torch.Tensor | None:
        """[V]: mean over text queries and heads of the attention each visual token got at ``layer``."""
        if layer not in self.prefill_scores:
            return None
        return self.prefill_scores[layer] / self.prefill_score_queries[layer]

    def multiplicities(self, layer: int, first_query: int, seq_len: int) -> torch.Tensor | None:
        """[nq, seq_len] multiplicities for the row's queries at ``first_query..seq_len-1``
        (each query gets the view in force at its position), or None when all are 1."""
        if not self.view.history or seq_len - 1 < self.view.history[0][0]:
            return None
        key = (self.view.group_of(layer), self.view.version, first_query, seq_len)
        if self._cached[0] == key:
            return self._cached[1]
        rows = [self.view.at(q).multiplicity(layer, seq_len) for q in range(first_query, seq_len)]
        value = None if all(r is None for r in rows) else torch.stack(
            [torch.ones(seq_len) if r is None else r for r in rows])
        self._cached = (key, value)
        return value

    def key_copy(self, layer: int, first_query: int, k_region, k_offsets, block_row) -> KeyCopy | None:
        """The token-major copy of the visual tokens' K at ``layer`` (made on first use), for a
        row whose queries start at ``first_query``; None when the policy keeps no copy or the
        row is not decoding (the prompt's K may not all be cached yet)."""
        if not self.dp.key_copy or first_query < self.num_prompt_tokens:
            return None
        copy = self.key_copies.get(layer)
        if copy is None:
            copy = self.key_copies[layer] = copy_keys(k_region, k_offsets, block_row, self.visual_positions,
                                                      self.visual_rows)
        return copy

    @cached_property
    def visual_rows(self) -> torch.Tensor:
        """[P] int32: each position's row in the key copies (-1: not visual), one for all layers."""
        return rows_of(self.visual_positions)

    def track_blocks(self, block_ids) -> None:
        """vLLM replaces a request's block ids object when it resumes after preemption: its
        KV is then recomputed into new blocks, and copies of the old one are dropped."""
        if block_ids is not self.block_ids:
            self.key_copies.clear()
            self.block_ids = block_ids

    def decide(self, position: int, mass: torch.Tensor, keys: torch.Tensor, seq_len: int) -> None:
        """mass: [n] head-averaged attention of the query at ``position`` over the key
        positions ``keys`` [n] at the score layer. DyCoke's selection for layers >= L from there on."""
        per_position = torch.zeros(seq_len)
        per_position[keys] = mass.float()
        decision = self.dp.decide(per_position[self.visual_positions], self.dp_state)
        self.dp_state = decision.state
        self.view.apply(dp_plan(decision.selection, self.visual_positions), at_position=position)
        self.trace.append((position, None if decision.selection is None else decision.selection.tolist()))


def reclaimable_blocks(session: RequestSession, num_computed_tokens: int, block_size: int) -> list[int]:
    """Logical blocks of computed tokens, every one permanently evicted in every layer,
    not reported yet (DESIGN.md §4.4). Marks them reported."""
    full = num_computed_tokens // block_size
    if full == 0:
        return []
    dead = session.view.dead_everywhere(full * block_size).view(full, block_size).all(dim=1)
    blocks = [j for j in dead.nonzero().squeeze(1).tolist() if j not in session.reported_blocks]
    session.reported_blocks.update(blocks)
    return blocks


def collect_reclaimable(requests: dict, block_size: int) -> dict[str, list[int]]:
    """req_id -> newly reclaimable logical blocks, for every session (worker -> scheduler)."""
    report = {}
    for rid, session in SESSIONS.items():
        state = requests.get(rid)
        if state is None:
            continue
        if state.num_computed_tokens == 0:  # recomputed after preemption: its blocks are new again
            session.reported_blocks.clear()
            continue
        blocks = reclaimable_blocks(session, state.num_computed_tokens, block_size)
        if blocks:
            report[rid] = blocks
    return report


def dp_plan(selection: torch.Tensor | None, visual_positions: torch.Tensor) -> KVPlan:
    """Layers >= L attend to the selected visual tokens only (None: to all of them)."""
    if selection is None:
        return KVPlan(group=1, positions=torch.empty(0, dtype=torch.int64), values=torch.empty(0), reset=True)
    dropped = torch.ones(visual_positions.numel(), dtype=torch.bool)
    dropped[selection] = False
    positions = visual_positions[dropped]
    return KVPlan(group=1, positions=positions, values=torch.zeros(positions.numel()), reset=True)


def video_positions(mm_features) -> torch.Tensor:
    """Token positions of every video's visual tokens (each video's trailing newline excluded)."""
    spans = [torch.arange(f.mm_position.offset, f.mm_position.offset + f.mm_position.length - 1)
             for f in mm_features if f.modality == "video"]
    return torch.cat(spans) if spans else torch.empty(0, dtype=torch.int64)


def publish_rows(req_ids: list[str], requests: dict, dp: DP | None) -> None:
    """Called by the runner hook once per step, before attention metadata is built."""
    for gone in [rid for rid in SESSIONS if rid not in requests]:
        del SESSIONS[gone]
    rows = []
    for rid in req_ids:
        session = SESSIONS.get(rid)
        if session is None and dp is not None:
            state = requests[rid]
            positions = video_positions(state.mm_features)
            if positions.numel():
                session = SESSIONS[rid] = RequestSession(rid, state.num_prompt_tokens, positions, dp)
        if session is not None:
            session.track_blocks(requests[rid].block_ids)
        rows.append(session)
    _ROWS[:] = rows


def current_rows() -> list[RequestSession | None] | None:
    """Sessions of this step's batch rows, or None when no row has one (the fast path)."""
    return list(_ROWS) if any(r is not None for r in _ROWS) else None
