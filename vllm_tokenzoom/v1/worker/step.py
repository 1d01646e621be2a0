"""One forward of the model runner, as tokenzoom sees it.

Data flows one way (docs/architecture.md "A step"):
1. before the step, the runner hook makes a :class:`Step` with each batch row's session;
   the attention-metadata builder binds vLLM's common metadata to it;
2. per layer, the attention backend asks :meth:`Step.needs` what each row needs there: the
   queries to compute over the token view (their multiplicities over cache indices), and
   whose scores to hand back (:meth:`Step.record`);
3. between layers, :meth:`Step.settle` routes the recorded scores to the policies, which
   decide (the decode view from this query on; death layers during prefill);
4. when rows die, :meth:`Step.after_layer` (the model's decoder loop) gives the rows that
   remain and installs, for the layers after, attention metadata rebuilt for them; a step
   in which no row can die installs the compacted layers' metadata up front (:meth:`begin`).

Index spaces: *batch token* (a row of ``hidden_states`` in the current layout), *token
position*, *cache index* (``kv/layout.py``), *visual index*.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import cached_property

import torch

from vllm_tokenzoom.kv.layout import Segment
from vllm_tokenzoom.v1.worker.sessions import LaterScores

_CURRENT: list["Step | None"] = [None]
logger = logging.getLogger("vllm.tokenzoom")
_WARNED: set[str] = set()


def _warn_unbound(metadata_rows: int, batch_rows: int) -> None:
    """Once per process: a step whose requests have sessions runs vLLM's stock attention for every
    row, because its attention metadata is not the batch's (micro-batching is refused at start-up;
    this is for what was not foreseen), rather than silently."""
    if "unbound" not in _WARNED:
        _WARNED.add("unbound")
        logger.warning("tokenzoom: a step's attention metadata has %d request rows but its batch %d; that step "
                       "runs vLLM's stock attention for every request (no in-LLM pruning). Said once per process.",
                       metadata_rows, batch_rows)


@dataclass(frozen=True, eq=False)
class RowSpan:
    """One request row of the batch in a layout: its queries, where they sit, what they read."""

    start: int  # its first batch token
    positions: torch.Tensor  # [nq] int64 the positions of its queries, ascending
    seq_len: int  # positions 0..seq_len-1 are in the cache after this step
    segment: Segment | None  # None: a row without a session (identity layout)
    cache_len: int  # its sequence length in this layout's cache indices

    @property
    def num_queries(self) -> int:
        return self.positions.numel()

    @cached_property
    def first(self) -> int:
        return int(self.positions[0])

    @cached_property
    def last(self) -> int:
        return int(self.positions[-1])


@dataclass(frozen=True, eq=False)
class Layout:
    rows: tuple[RowSpan, ...]
    base_index: torch.Tensor  # [num_tokens] int64: each batch token's index in the step's full batch

    @property
    def num_tokens(self) -> int:
        return self.base_index.numel()


class QueryNeed:
    """One query tokenzoom handles at one layer: the indexed path computes it when it has a view
    or policies want its scores now (``scores``); the backend keeps it for the after-sampling
    policies (``later``), whose scores are computed once the sampled token says they are wanted."""

    __slots__ = ("row", "token", "position", "segment", "cache_len", "multiplicity", "scores", "session", "later")

    def __init__(self, row, token, position, segment, cache_len, multiplicity, scores, session, later=()):
        self.row, self.token, self.position, self.segment = row, token, position, segment
        self.cache_len, self.multiplicity, self.scores, self.session = cache_len, multiplicity, scores, session
        self.later = later

    @property
    def indexed(self) -> bool:
        return self.multiplicity is not None or bool(self.scores)


class Step:
    def __init__(self, sessions: list, num_layers: int, layer_names: list[str]):
        self.sessions = sessions  # batch row -> RequestSession or None
        self.num_layers, self.layer_names = num_layers, layer_names
        self.bound = False
        self.version = 0  # bumped whenever a decision changed a view
        self._inbox: dict[tuple, tuple[int, torch.Tensor]] = {}
        self._needs: dict[tuple, tuple[list[QueryNeed], list[QueryNeed]]] = {}
        self.prepared: dict[int, tuple] = {}  # id(needs) -> what a kernel call derived from them (the backend's)
        self.row_memo: dict[tuple, tuple] = {}  # one request's view -> its keys, biases, copy rows (ops.decode_requests)
        self._layouts: dict[int, Layout] = {}  # first layer -> layout in force from it
        first = {p.first_layer for s in sessions if s is not None for p in s.decode.values()}
        self._first_layers = tuple(sorted(first))
        # the layers some row may score at this step: a layer that scores nothing shares its needs
        self._score_layers = frozenset().union(*(s.score_layers() for s in sessions if s is not None))

    # -- set-up ----------------------------------------------------------------------------
    def bind(self, builder, common) -> bool:
        """vLLM's metadata builder and common metadata of this step (first build only);
        False when the batch is not this step's (a profiling or dummy run)."""
        if self.bound:
            return True
        if common.num_reqs != len(self.sessions):
            _warn_unbound(common.num_reqs, len(self.sessions))
            return False
        self.builder, self.common, self.bound = builder, common, True
        qsl = common.query_start_loc_cpu.tolist()
        # exact outside speculative decoding (refused with in-LLM methods); no device sync
        upper = common.seq_lens_cpu_upper_bound
        seq_lens = (upper if upper is not None else common.seq_lens.cpu()).tolist()
        rows = []
        for r, session in enumerate(self.sessions):
            n = qsl[r + 1] - qsl[r]
            segment = session.layout.segment(0) if session is not None else None
            rows.append(RowSpan(qsl[r], torch.arange(seq_lens[r] - n, seq_lens[r]), seq_lens[r], segment,
                                seq_lens[r]))
        self._layouts[0] = Layout(tuple(rows), torch.arange(common.num_actual_tokens))
        return True

    def complete_token_maps(self) -> None:
        """At the start of the forward (the step's videos are encoded by now): every session's
        token map gets its videos' frames and cells."""
        for session in self.sessions:
            if session is not None:
                session.complete_token_map()

    def may_drop_rows(self) -> bool:
        """Whether a row may lose tokens this step: it computes visual tokens of a request with
        a prefill policy (deciding now, or replaying stored death layers after preemption)."""
        for session, span in zip(self.sessions, self._layouts[0].rows):
            if session is None or not session.prefill or not span.num_queries or not session.token_map.num_visual:
                continue
            positions = session.token_map.positions
            if int(span.positions[0]) <= int(positions[-1]) and int(span.positions[-1]) >= int(positions[0]):
                return True
        return False

    def begin(self, ctx) -> None:
        """A step in which no row dies: install the metadata of every compacted layer now."""
        layout = self._layouts[0]
        for layer in sorted({b for s in self.sessions if s is not None for b in s.layout.boundaries}):
            new, keep = self._layout_for(layer, layout)
            if new is not layout:
                assert keep.numel() == layout.num_tokens, "rows died in a step that was not expected to drop any"
                self._install(ctx, layer, new, pad=True)
                layout = new

    # -- per layer (attention backend) ---------------------------------------------------
    def layout(self, layer: int) -> Layout:
        return self._layouts[max(k for k in self._layouts if k <= layer)]

    def needs(self, layer: int) -> list[QueryNeed]:
        """The queries tokenzoom's indexed path computes at ``layer`` (after settling decisions)."""
        return self._needs_at(layer)[0]

    def later(self, layer: int) -> list[QueryNeed]:
        """The queries at ``layer`` that the backend keeps for after-sampling scores (:meth:`keep`)."""
        return self._needs_at(layer)[1]

    def _needs_at(self, layer: int) -> tuple[list[QueryNeed], list[QueryNeed]]:
        self.settle()
        layout = self.layout(layer)
        # layers that read the same layout and views and score nothing share their needs
        scoring = layer if layer in self._score_layers else None
        key = (id(layout), self.version, scoring, tuple(layer >= f for f in self._first_layers))
        cached = self._needs.get(key)
        if cached is not None:
            return cached
        needs = []
        for r, (session, span) in enumerate(zip(self.sessions, layout.rows)):
            if session is not None and span.num_queries:
                needs += self._row_needs(layer, r, session, span)
        if len(self._needs) > 16:
            self._needs.clear()
            self.prepared.clear()
        pair = self._needs[key] = ([n for n in needs if n.indexed], [n for n in needs if n.later])
        return pair

    def _row_needs(self, layer: int, row: int, session, span: RowSpan) -> list[QueryNeed]:
        first, last = span.first, span.last
        n = session.num_prompt_tokens
        if first == last >= n and layer not in session.decode_score_layers:  # a decode row no policy scores here
            if not session.view.factors(layer, last):
                return []
            m = session.multiplicity(layer, last, span.segment)
            return [QueryNeed(row, span.start, last, span.segment, span.cache_len, m, (), session)]
        asks: dict[int, list[str]] = {}
        for name, positions in session.score_queries(layer, first, last):
            for q in positions:
                asks.setdefault(q, []).append(name)
        candidates = sorted(set(asks) | set(range(max(first, session.num_prompt_tokens), last + 1)))
        needs = []
        for q in candidates:
            has_view = bool(session.view.factors(layer, q))
            if not has_view and q not in asks:
                continue
            token = span.start + (span.num_queries - 1 - (last - q) if q >= session.num_prompt_tokens
                                  else int(torch.searchsorted(span.positions, q)))
            cache_len = (span.segment.generated_index(q) if q >= session.num_prompt_tokens
                         else int(span.segment.cache_index(torch.tensor([q]))[0])) + 1
            m = session.multiplicity(layer, q, span.segment) if has_view else None
            split = {True: [], False: []}
            for name in asks.get(q, ()):
                split[session.scores_later(name)].append(name)
            needs.append(QueryNeed(row, token, q, span.segment, cache_len, m, tuple(split[False]), session,
                                   tuple(split[True])))
        return needs

    def record(self, layer: int, need: QueryNeed, mass: torch.Tensor, keys: torch.Tensor) -> None:
        """mass: [n] head-mean attention of ``need``'s query over the cache indices ``keys``."""
        self._post(layer, need, need.scores, need.session.visual_scores(need.segment, mass, keys, need.cache_len))

    def keep(self, layer: int, need: QueryNeed, compute) -> None:
        """``compute()`` -> [V] scores of ``need``'s query, kept by the backend, for the policies
        in ``need.later`` (called only if the token this forward samples calls for them)."""
        self._post(layer, need, need.later, LaterScores([compute]))

    def _post(self, layer: int, need: QueryNeed, names, scores) -> None:
        for name in names:
            slot = (need.session, name, layer)
            position, total = self._inbox.get(slot, (need.position, None))
            self._inbox[slot] = (max(position, need.position), scores if total is None else total + scores)

    # -- between layers ---------------------------------------------------------------------
    def settle(self) -> None:
        """Hand the recorded scores to their policies (decisions in force from the next layer on)."""
        if not self._inbox:
            return
        inbox, self._inbox = self._inbox, {}
        changed = False
        for (session, name, layer), (position, scores) in inbox.items():
            changed |= session.decide(name, layer, position, scores)
        self.version += changed

    def after_layer(self, layer: int, ctx, num_rows: int) -> torch.Tensor | None:
        """The decoder loop, after ``layer`` ran on ``num_rows`` hidden rows: settle, and when rows
        die, install the next layers' metadata and return the batch tokens that remain ([n]
        indices into the current hidden states); None when the rows stay."""
        self.settle()
        if layer + 1 >= self.num_layers:
            return None
        current = self.layout(layer)
        new, keep = self._layout_for(layer + 1, current)
        if new is current:
            return None
        self._install(ctx, layer + 1, new, pad=False)
        return keep if keep.numel() != num_rows else None

    def finish(self) -> None:
        """After the forward: settle what the last layers recorded; a request whose last prompt
        token was computed has its prefill decisions stored for good."""
        self.settle()
        for session, span in zip(self.sessions, self._layouts[0].rows):
            if session is not None and span.num_queries and int(span.positions[-1]) >= session.num_prompt_tokens - 1:
                session.finish_prefill()

    # -- layouts and metadata ------------------------------------------------------------------
    def _layout_for(self, layer: int, current: Layout) -> tuple[Layout, torch.Tensor | None]:
        """The layout from ``layer`` on, given the one before; (current, None) when unchanged."""
        rows, keep, changed, start = [], _Indices(), False, 0
        for session, span in zip(self.sessions, current.rows):
            segment = session.layout.segment(layer) if session is not None else None
            if segment is span.segment:
                new = span if span.start == start else dataclasses.replace(span, start=start)
                keep.add_range(span.start, span.start + span.num_queries)
            elif span.num_queries == 1 and span.first >= session.num_prompt_tokens:  # decode: never dies
                changed = True
                keep.add_range(span.start, span.start + 1)
                new = RowSpan(start, span.positions, span.seq_len, segment, segment.generated_index(span.last) + 1)
            else:
                changed = True
                alive = segment.cache_index(span.positions) >= 0 if span.num_queries else span.positions.bool()
                keep.add(span.start + alive.nonzero().flatten())
                new = RowSpan(start, span.positions[alive], span.seq_len, segment, segment.cache_len(span.seq_len))
            rows.append(new)
            start += new.num_queries
        if not changed:
            return current, None
        keep = keep.tensor()
        return Layout(tuple(rows), current.base_index[keep]), keep

    def _install(self, ctx, layer: int, layout: Layout, pad: bool) -> None:
        """Attention metadata and slot mapping rebuilt for ``layout``, for layers >= ``layer``;
        ``pad``: the hidden states keep vLLM's padding rows (slot -1), as the stock forward does."""
        self._layouts = {k: v for k, v in self._layouts.items() if k < layer}
        self._layouts[layer] = layout
        common, device = self.common, self.common.block_table_tensor.device
        qsl = torch.tensor([0] + [r.start + r.num_queries for r in layout.rows], dtype=torch.int32)
        seq_lens = torch.tensor([r.cache_len for r in layout.rows], dtype=common.seq_lens.dtype)
        slots = self._slots(layout).to(device)
        padded = common.slot_mapping.numel()
        if pad and padded > slots.numel():
            slots = torch.cat((slots, torch.full((padded - slots.numel(),), -1, dtype=slots.dtype, device=device)))
        fields = dict(query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, seq_lens=seq_lens.to(device),
                      num_actual_tokens=layout.num_tokens,
                      max_query_len=max((r.num_queries for r in layout.rows), default=0),
                      max_seq_len=max((r.cache_len for r in layout.rows), default=0), slot_mapping=slots)
        if common.positions is not None:
            fields["positions"] = common.positions[layout.base_index.to(device)]
        if common.seq_lens_cpu_upper_bound is not None:
            fields["seq_lens_cpu_upper_bound"] = seq_lens
        metadata = self.builder.build(0, dataclasses.replace(common, **fields))
        for name in self.layer_names[layer:]:
            ctx.attn_metadata[name] = metadata
            ctx.slot_mapping[name] = slots

    def _slots(self, layout: Layout) -> torch.Tensor:
        """[num_tokens] the KV slot each batch token writes in this layout (on the cache's
        device: one gather through the block table for every compacted row, no host sync)."""
        device = self.common.slot_mapping.device
        base = self.common.slot_mapping[layout.base_index.to(device)]
        rows, index, tokens = _Indices(), _Indices(), _Indices()
        for r, span in enumerate(layout.rows):
            if span.segment is None or not span.segment.compacted or not span.num_queries:
                continue
            tokens.add_range(span.start, span.start + span.num_queries)
            if span.num_queries == 1 and span.first >= span.segment.num_prompt_tokens:  # a decode row
                rows.add_range(r, r + 1)
                c = span.segment.generated_index(span.first)
                index.add_range(c, c + 1)
            else:
                rows.add(torch.full((span.num_queries,), r))
                index.add(span.segment.cache_index(span.positions))  # [nq] cache indices
        index = index.tensor().to(device)
        if not index.numel():
            return base
        block_table, block_size = self.common.block_table_tensor, self.block_size
        blocks = block_table[rows.tensor().to(device), index // block_size].to(base.dtype)
        base = base.clone()
        base[tokens.tensor().to(device)] = blocks * block_size + index % block_size
        return base

    @property
    def block_size(self) -> int:
        return self.builder.kv_cache_spec.block_size


class _Indices:
    """Batch-token indices gathered row by row: ranges as Python ints, tensors as they come
    (one tensor at the end, not one per row)."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []
        self.ints: list[int] = []

    def add_range(self, lo: int, hi: int) -> None:
        self.ints.extend(range(lo, hi))

    def add(self, indices: torch.Tensor) -> None:
        self._flush()
        self.parts.append(indices)

    def _flush(self) -> None:
        if self.ints:
            self.parts.append(torch.tensor(self.ints, dtype=torch.int64))
            self.ints = []

    def tensor(self) -> torch.Tensor:
        self._flush()
        return torch.cat(self.parts) if self.parts else torch.empty(0, dtype=torch.int64)


def set_current(step: Step | None) -> None:
    _CURRENT[0] = step


def current() -> Step | None:
    """This step's :class:`Step` once bound to its metadata, else None (fast path)."""
    step = _CURRENT[0]
    return step if step is not None and step.bound else None
