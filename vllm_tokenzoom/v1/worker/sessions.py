"""Worker-side state of each running request that an in-LLM policy acts on.

A :class:`RequestSession` knows no method. It owns, per request:
- the token map (position -> video, frame, cell; ``kv/token_map.py``), fed from the pre-LLM
  plan the model attached to the request's encoder output;
- the token view (``kv/view.py``): death layers from prefill policies, one multiplicity
  layer per decode policy, composed by product; and the cache layout it implies (``kv/layout.py``);
- score routing: which queries of a batch row each policy wants scores of, at which layer;
- the policies' decisions, made between layers from the scores the backend handed back
  (:meth:`decide`), stored so a request recomputed after preemption is never re-decided;
- key copies (CPU), reclaimed-block bookkeeping, and an opt-in trace (``TOKENZOOM_TRACE=1``,
  ``records.py``). What the sessions report after a step: ``reports.py``.
Sessions are created by the model-runner hook for requests with a video when the engine's
config has prefill or decode policies, kept across preemption (the runner keeps the
request's state), and released when the runner drops the request (finished or aborted;
``release_gone``, run at every scheduler step, also an empty one on an idle server).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from vllm_tokenzoom.kv.layout import CacheLayout, Segment, pack_segments
from vllm_tokenzoom.kv.token_map import TokenMap
from vllm_tokenzoom.kv.view import TokenView
from vllm_tokenzoom.methods.base import DecodePolicy, PrefillPolicy, Queries
from vllm_tokenzoom.ops import KeyCopy, copy_keys, derive_packed
from vllm_tokenzoom.v1.worker.records import TRACES, mark_open, start_trace, trace_dir, tracing, write_record

SESSIONS: dict[str, "RequestSession"] = {}


@dataclass
class Figures:
    """A session's figures for tokenzoom's metrics (``metrics.py``) since they were last taken:
    prefill rows not computed, per method; the share of the visual tokens each decode step reads
    (one value per step); blocks reported reclaimable; seconds in each policy decision."""

    rows_skipped: dict[str, int] = field(default_factory=dict)
    read_shares: list[float] = field(default_factory=list)
    blocks_reclaimed: int = 0
    policy_seconds: list[tuple[str, float]] = field(default_factory=list)

    def skipped(self, method: str, rows: int) -> None:
        self.rows_skipped[method] = self.rows_skipped.get(method, 0) + rows

    def timed(self, method: str, seconds: float) -> None:
        self.policy_seconds.append((method, seconds))

    def take(self) -> dict | None:
        """The figures as a plain dict (they cross to the front-end process), emptied; None if none."""
        if not (self.rows_skipped or self.read_shares or self.blocks_reclaimed or self.policy_seconds):
            return None
        out = {"rows_skipped": self.rows_skipped, "read_shares": self.read_shares,
               "blocks_reclaimed": self.blocks_reclaimed, "policy_seconds": self.policy_seconds}
        self.rows_skipped, self.read_shares, self.blocks_reclaimed, self.policy_seconds = {}, [], 0, []
        return out


class LaterScores:
    """An after-sampling policy's scores before they are computed: per score layer, a function
    computing that layer's [V] scores from the query the forward kept (its keys stay in the
    cache until the next step runs). Summed in layer order, as the forward would have."""

    __slots__ = ("parts",)

    def __init__(self, parts: list):
        self.parts = parts

    def __add__(self, other: "LaterScores") -> "LaterScores":
        return LaterScores(self.parts + other.parts)

    def compute(self) -> torch.Tensor:
        total = None
        for part in self.parts:
            scores = part()
            total = scores if total is None else total + scores
        return total


@dataclass(eq=False)
class RequestSession:
    req_id: str
    token_map: TokenMap
    num_layers: int
    prefill: dict[str, PrefillPolicy]
    decode: dict[str, DecodePolicy]
    view: TokenView = field(init=False)
    states: dict[str, Any] = field(default_factory=dict)
    prefill_done: bool = False  # the prefill policies decided (a recompute replays, never re-decides)
    decided_at: dict[str, int] = field(default_factory=dict)  # decode policy -> last position it decided at
    key_copies: dict[int, KeyCopy] = field(default_factory=dict)  # layer -> K of the alive visual tokens
    copied_blocks: tuple = ()  # the physical blocks the copies were read from
    reported_blocks: set[int] = field(default_factory=set)  # logical blocks handed back to the scheduler
    # (spans, encoder-cache identifiers, the runner's encoder cache) while the token map lacks
    # a video's pre-LLM plan: the encoder runs in the step's forward, after the session is made
    plans: tuple | None = None
    # after-sampling decode policy -> (the sampling query's position, its scores summed over
    # layers: LaterScores until the sampled token is known, then a tensor or None if not wanted)
    sampled_scores: dict[str, tuple[int, Any]] = field(default_factory=dict)
    results_given: set[str] = field(default_factory=set)  # decode policies whose result went to the caller
    figures: Figures = field(default_factory=Figures)  # what the metrics count, since last taken
    _layout: tuple = (None, None)
    _multiplicities: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.view = TokenView(self.token_map.num_visual, self.num_layers)
        if tracing():
            start_trace(self.req_id, (*self.prefill, *self.decode))

    def complete_token_map(self) -> None:
        """Fill in each video's frames and cells from the plan the model attached to its encoder
        output (``tokenzoom_kept``), once every video of the request has been encoded."""
        if self.plans is None:
            return
        spans, idents, cache = self.plans
        kept = [getattr(cache.get(ident), "tokenzoom_kept", None) for ident in idents]
        if all(k is not None for k in kept):
            self.token_map = TokenMap.build(self.num_prompt_tokens, spans, kept)
            self.plans = None

    @property
    def num_prompt_tokens(self) -> int:
        return self.token_map.num_prompt_tokens

    @property
    def layout(self) -> CacheLayout:
        version, layout = self._layout
        if version != self.view.death_version:
            layout = CacheLayout(self.token_map, self.view.death, self.num_layers)
            self._layout = (self.view.death_version, layout)
        return layout

    # -- score routing ---------------------------------------------------------------------
    @cached_property
    def decode_score_layers(self) -> frozenset[int]:
        """The layers at which a decode policy scores the query of a decode step."""
        return frozenset(layer for layer, asks in self._asks_by_layer.items() if any(not p for _, _, p in asks))

    @cached_property
    def _asks_by_layer(self) -> dict[int, tuple[tuple[str, Queries, bool], ...]]:
        """layer -> (policy, queries, is a prefill policy) of every score request at that layer
        (policies are frozen: built once, not per layer call)."""
        asks: dict[int, list] = {}
        for prefill, policies in ((True, self.prefill), (False, self.decode)):
            for name, policy in policies.items():
                for ask in policy.score_requests():
                    asks.setdefault(ask.layer, []).append((name, ask.queries, prefill))
        return {layer: tuple(a) for layer, a in asks.items()}

    @cached_property
    def _all_score_layers(self) -> frozenset[int]:
        return frozenset(self._asks_by_layer)

    def score_layers(self) -> frozenset[int]:
        """The layers at which a policy may want scores of this request this step: the decode
        policies' once the prefill is done (its policies never score again, also not when a
        preempted request is recomputed: it replays their decisions)."""
        return self.decode_score_layers if self.prefill_done else self._all_score_layers

    def score_queries(self, layer: int, first: int, last: int) -> list[tuple[str, list[int]]]:
        """(policy, query positions) whose scores a policy wants at ``layer`` from a batch row
        computing positions ``first..last``."""
        out = []
        n = self.num_prompt_tokens
        for name, queries, prefill in self._asks_by_layer.get(layer, ()):
            if prefill:
                if self.prefill_done:
                    continue
                if queries is Queries.LAST_PROMPT and first <= n - 1 <= last:
                    out.append((name, [n - 1]))
                elif queries is Queries.TEXT_AFTER_VIDEO:
                    lo, hi = max(first, self.token_map.first_text_position), min(last + 1, n)
                    if hi > lo and last >= n - 1:
                        out.append((name, list(range(lo, hi))))
            elif last > self.decided_at.get(name, -1) and (
                    last >= n or (queries is Queries.NEXT_TOKEN and last == n - 1)):
                out.append((name, [last]))
        return out

    # -- decisions (between layers) ----------------------------------------------------------
    def scores_later(self, name: str) -> bool:
        """Whether ``name``'s scores are computed after sampling, from queries the forward kept."""
        policy = self.decode.get(name)
        return policy is not None and policy.after_sampling

    def decide(self, name: str, layer: int, position: int, scores) -> bool:
        """scores: [V] fp32, summed over the queries the policy asked for at ``layer`` (an
        after-sampling policy's: :class:`LaterScores`). -> whether a view may have changed."""
        if name in self.prefill:
            policy = self.prefill[name]
            if name not in self.states:
                self.states[name] = policy.start(self.token_map)
            t0 = time.perf_counter()
            dropped, self.states[name] = policy.decide(layer, scores, self.states[name])
            if dropped is not None:
                before = int((self.view.death > layer).sum())
                self.view.drop_after(dropped, layer)
                # each token leaving after ``layer`` is a row none of the layers after it computes
                left = before - int((self.view.death > layer).sum())
                self.figures.skipped(name, left * (self.num_layers - 1 - layer))
                self._trace(name, lambda: policy.describe(layer, dropped, self.states[name]))
            self.figures.timed(name, time.perf_counter() - t0)
            return True
        policy = self.decode[name]
        if policy.after_sampling:  # summed over its layers; decided once the token is known
            seen, total = self.sampled_scores.get(name, (position, None))
            self.sampled_scores[name] = (position, scores if total is None or seen != position else total + scores)
            return False
        t0 = time.perf_counter()
        value, self.states[name] = policy.step(scores, self._state(name))
        self._push(name, position, value)
        self.figures.timed(name, time.perf_counter() - t0)
        return True

    def resolve_sampled(self, output_token_ids) -> None:
        """Right after sampling (sync scheduling: the token on the host, the cache as the forward
        left it): each after-sampling policy's kept queries become scores if the sampled token
        calls for them (``DecodePolicy.wants_scores``), else None; no attention computed then."""
        for name, (position, scores) in list(self.sampled_scores.items()):
            token = self._sampled_token(position, output_token_ids)
            if isinstance(scores, LaterScores) and token is not None:
                wanted = self.decode[name].wants_scores(self._state(name), token)
                self.sampled_scores[name] = (position, scores.compute() if wanted else None)

    def take_sampled(self, output_token_ids, reporting_only: bool = False) -> None:
        """Between steps: the after-sampling policies decide from the scores of the forward that
        sampled the newest token and from that token; in force from the query after it. Their
        kept queries are scored first (:meth:`resolve_sampled`; sync scheduling: right after
        sampling, by ``reports.take_sampled_now``).
        ``reporting_only``: only those with a result for the caller (``DecodePolicy.reports``)."""
        self.resolve_sampled(output_token_ids)
        for name, (position, scores) in list(self.sampled_scores.items()):
            if reporting_only and not self.decode[name].reports:
                continue
            token = self._sampled_token(position, output_token_ids)
            if token is None:
                continue  # not on the host yet
            del self.sampled_scores[name]
            policy = self.decode[name]
            t0 = time.perf_counter()
            value, self.states[name] = policy.step(scores, self._state(name), token)
            self._push(name, position + 1, value)
            self.figures.timed(name, time.perf_counter() - t0)

    def _sampled_token(self, position: int, output_token_ids) -> int | None:
        """The token the forward of the query at ``position`` sampled, None if not on the host yet."""
        i = position + 1 - self.num_prompt_tokens  # the sampled token sits at position + 1
        if i >= len(output_token_ids) or output_token_ids[i] < 0:
            return None
        return int(output_token_ids[i])

    def _state(self, name: str) -> Any:
        """A decode policy's state, started once the token map is complete (after the first forward)."""
        if name not in self.states:
            self.states[name] = self.decode[name].start(self.token_map)
        return self.states[name]

    def take_results(self) -> dict[str, Any]:
        """The decode policies' results for the caller (``DecodePolicy.result``), each handed out once."""
        out = {}
        for name, policy in self.decode.items():
            if policy.reports and name not in self.results_given and name in self.states:
                result = policy.result(self.states[name])
                if result is not None:
                    out[name] = result
                    self.results_given.add(name)
        return out

    def _push(self, name: str, position: int, value: torch.Tensor | None) -> None:
        policy = self.decode[name]
        self.view.push(name, policy.first_layer, position, value, policy.permanent)
        self.decided_at[name] = max(position - policy.after_sampling, self.decided_at.get(name, -1))
        self._trace(name, lambda: policy.describe(position, value, self.states[name]))

    def finish_prefill(self) -> None:
        """The prompt is computed: the prefill policies' decisions are final (a recompute after
        preemption replays them). The trace records the layer-averaged visual KV share."""
        if not self.prefill_done and tracing() and self.req_id in TRACES:
            TRACES[self.req_id]["visual_kv_share"] = self.view.visual_kv_share
        self.prefill_done = True

    def record(self) -> dict:
        """What a request's visual tokens went through, for the token-map pictures: where each
        came from (video, frame, cell), its death layer, and every method's decisions."""
        tm = self.token_map
        return {"request_id": self.req_id, "num_layers": self.num_layers, "num_prompt_tokens": tm.num_prompt_tokens,
                "cells": list(tm.cells), "pooled_cells": list(tm.pooled),
                "methods": {n: p.settings() for n, p in {**self.prefill, **self.decode}.items()},
                "position": tm.positions.tolist(), "video": tm.video.tolist(), "frame": tm.frame.tolist(),
                "cell": tm.cell.tolist(), "death": self.view.death.tolist(), "decisions": TRACES.get(self.req_id, {})}

    def _trace(self, name: str, entry) -> None:
        """Log a decision (``entry()``: built only when tracing, as it syncs with the device;
        None: nothing to log)."""
        if tracing() and self.req_id in TRACES:
            logged = entry()
            if logged is not None:
                TRACES[self.req_id].setdefault(name, []).append(logged)

    # -- what the attention reads --------------------------------------------------------------
    def multiplicity(self, layer: int, position: int, segment: Segment) -> torch.Tensor | None:
        """[P] float32 multiplicities over the segment's prompt cache indices (its ``P`` alive
        prompt tokens; generated tokens after them read 1) for the query at ``position``
        (None: all ones). The same object for the same view, across steps: the kernels'
        keys and biases derived from it are computed once per view."""
        factors = self.view.factors(layer, position)
        if not factors:
            return None
        key = (id(segment), *map(id, factors))
        hit = self._multiplicities.get(key)
        if hit is not None:
            return hit[1]
        if len(self._multiplicities) > 64:
            self._multiplicities.clear()
        visual = self.view.multiplicity(layer, position)  # [V]
        # every segment of the layout at once (a segment of an older layout alone)
        segments = self.layout.segments
        pack = self.layout.packed_on(visual.device) if any(s is segment for s in segments) else None
        if pack is None:
            segments = [segment]
            pack = pack_segments(segments, visual.device)
        copied = [s.copy_rows for s in segments] if any(p.key_copy for p in self.decode.values()) else None
        for s, m in zip(segments, derive_packed(pack.spread(visual), pack, copied)):
            self._multiplicities[(id(s), *map(id, factors))] = ((s, factors), m)  # holds what makes the key
        return self._multiplicities[key][1]

    def visual_scores(self, segment: Segment, mass: torch.Tensor, keys: torch.Tensor, cache_len: int) -> torch.Tensor:
        """mass: [n] over the cache indices ``keys`` (all < ``cache_len``) -> [V] fp32 per visual
        token (0 where dead)."""
        per_key = torch.zeros(cache_len, device=mass.device)
        per_key[keys.to(mass.device)] = mass.float()
        rows, index = segment.alive_on(mass.device)
        scores = torch.zeros(self.token_map.num_visual, device=mass.device)
        scores[rows] = per_key[index]
        return scores

    def wants_key_copy(self, layer: int) -> bool:
        return any(p.key_copy and layer >= p.first_layer for p in self.decode.values())

    def key_copy(self, layer: int, segment: Segment, k_region, k_offsets, block_row) -> KeyCopy:
        """The token-major copy of the alive visual tokens' K at ``layer`` (made on first use)."""
        copy = self.key_copies.get(layer)
        if copy is None:
            index = segment.visual_cache_index
            copy = self.key_copies[layer] = copy_keys(k_region, k_offsets, block_row, index[index >= 0],
                                                      segment.copy_rows)
        return copy

    def track_blocks(self, block_ids, block_size: int) -> None:
        """Key copies are dropped when the blocks under the visual tokens change (vLLM hands a
        preempted request new blocks and recomputes its KV)."""
        last = int(self.token_map.positions[-1]) // block_size + 1 if self.token_map.num_visual else 0
        blocks = tuple(block_ids[0][:last]) if block_ids else ()
        if blocks != self.copied_blocks:
            self.key_copies.clear()
            self.copied_blocks = blocks

    def settle(self) -> None:
        """Between steps: fold this step's view values into the compact history."""
        self.view.settle()


def write_live_records(model=None) -> int:
    """Write the record of every live session (``LLM.apply_model``: offline, the runner releases
    the last requests of a ``generate`` call only at the engine's next step)."""
    for session in SESSIONS.values():
        write_record(session)
    return len(SESSIONS)


def video_spans(mm_features) -> list[tuple[int, int, str]]:
    """(offset, length, identifier) of every video's placeholder run, in prompt order."""
    spans = [(f.mm_position.offset, f.mm_position.length, f.identifier) for f in mm_features if f.modality == "video"]
    return sorted(spans)


def new_session(req_id: str, state, config, num_layers: int, encoder_cache: dict) -> RequestSession | None:
    """A session for a request with a video, when the config has in-LLM policies (else None)."""
    from vllm_tokenzoom.methods.base import Stage

    spans = video_spans(state.mm_features)
    if not spans:
        return None
    kept = [getattr(encoder_cache.get(ident), "tokenzoom_kept", None) for _, _, ident in spans]
    places = [(o, n) for o, n, _ in spans]
    token_map = TokenMap.build(state.num_prompt_tokens, places, kept)
    plans = None if all(k is not None for k in kept) else (places, [i for _, _, i in spans], encoder_cache)
    return RequestSession(req_id, token_map, num_layers, config.stage(Stage.PREFILL), config.decode, plans=plans)


def release_gone(requests: dict) -> None:
    """Drop the sessions (and their key copies) of requests the runner no longer holds; with
    ``TOKENZOOM_TRACE_DIR``, write each one's record there first."""
    for gone in [rid for rid in SESSIONS if rid not in requests]:
        write_record(SESSIONS.pop(gone))


def begin_step(runner, req_ids: list[str]) -> None:
    """Before a step's attention metadata is built: this step's :class:`Step` (row -> session),
    or none when no row has a session (the fast path)."""
    from vllm_tokenzoom.requests import from_extra_args
    from vllm_tokenzoom.v1.worker.step import Step, set_current

    model = runner.get_model()
    default = getattr(model, "tokenzoom", None)
    if default is None:
        set_current(None)
        return
    traced = trace_dir() is not None  # traced: a record for pre-LLM methods too
    layer_names = model.tokenzoom_layer_names
    block_size = runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    rows = []
    for rid in req_ids:
        session, state = SESSIONS.get(rid), runner.requests[rid]
        if session is None:
            params = state.sampling_params
            config = model.tokenzoom_for(from_extra_args(params.extra_args if params is not None else None))
            if config.in_llm or traced:
                session = new_session(rid, state, config, len(layer_names), runner.encoder_cache)
                if session is not None:
                    SESSIONS[rid] = session
                    if traced:
                        mark_open(rid)
        if session is not None:
            if session.sampled_scores:
                session.take_sampled(state.output_token_ids)
            session.settle()
            session.track_blocks(state.block_ids, block_size)
        rows.append(session)
    set_current(Step(rows, len(layer_names), layer_names) if any(r is not None for r in rows) else None)
