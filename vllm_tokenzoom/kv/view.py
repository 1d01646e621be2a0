"""The token view of one request (DESIGN.md §4.2): what each layer reads of each visual token.

Layer ``l`` reads visual token ``v`` for the query at position ``q`` with multiplicity

    m(l, q, v) = [death[v] >= l] * prod over policy layers covering l of  value_at(q)[v]

- ``death[v]``: the last layer that computes token ``v`` (prefill policies, permanent; the
  token's row leaves the batch after it, so later layers never write or read its KV);
- a *policy layer*: one decode policy's multiplicities for layers ``>= first_layer``, each in
  force from the query position it was set at: 0 skips the token, 1 reads it, k counts it
  k times (a logit bias ``log k``); setting it above 0 again revives it, unless the layer is
  ``permanent``. Each policy edits only its own layer, so no plan erases another's.
KV never moves and positions are never renumbered. Non-visual tokens always read as 1.

*Compact history*: a policy layer keeps only its distinct values, each with the position
it starts at, so a recomputation (after preemption) gives every query its view in time
proportional to the distinct views. Values are settled (deduplicated) between steps.

Index space: *visual indices* (``kv/token_map.py``); tensors live on the scores' device,
``death`` on the host (it sizes the batch).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch


def visual_kv_share(death: torch.Tensor, num_layers: int) -> float:
    """methods-spec §0 (VAS's "Img-Memory"): the share of the visual tokens whose KV a layer
    holds, averaged over the layers, from each token's death layer ``death`` [V]."""
    return float((death + 1).sum()) / (num_layers * death.numel()) if death.numel() else 1.0


@dataclass
class History:
    """The distinct values one policy layer took, and from which query position each is in force."""

    starts: list[int] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)  # [V] counts (uint8) or float32; None = all ones
    pending: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)

    @property
    def last_position(self) -> int:
        if self.pending:
            return self.pending[-1][0]
        return self.starts[-1] if self.starts else -1

    def push(self, position: int, value: torch.Tensor | None) -> None:
        if position <= self.last_position:
            raise ValueError(f"views are set in position order: {position} after {self.last_position}")
        self.pending.append((position, value))

    def settle(self) -> None:
        """Fold pending values in, dropping those equal to the value before (a host sync, between steps)."""
        for position, value in self.pending:
            last = self.values[-1] if self.values else None
            if self.values and (value is last or (value is not None and last is not None and torch.equal(value, last))):
                continue
            self.starts.append(position)
            self.values.append(value)
        self.pending.clear()

    def at(self, position: int) -> torch.Tensor | None:
        """The value in force for the query at ``position`` (None: all ones, or never set)."""
        for start, value in reversed(self.pending):
            if start <= position:
                return value
        i = bisect.bisect_right(self.starts, position) - 1
        return self.values[i] if i >= 0 else None


@dataclass
class PolicyLayer:
    first_layer: int
    permanent: bool = False  # zeros can never be revived (their blocks may be given back)
    history: History = field(default_factory=History)
    forever: torch.Tensor | None = None  # [V] bool, permanent zeros so far


class TokenView:
    def __init__(self, num_visual: int, num_layers: int):
        self.num_visual, self.num_layers = num_visual, num_layers
        self.death = torch.full((num_visual,), num_layers - 1, dtype=torch.int64)  # [V], host
        self.layers: dict[str, PolicyLayer] = {}
        self.death_version = 0

    # -- prefill: death layers ----------------------------------------------------------
    def drop_after(self, dropped: torch.Tensor, layer: int) -> None:
        """dropped: [V] bool; their rows leave the batch after ``layer`` (never revived)."""
        dropped = dropped.to("cpu", torch.bool) & (self.death > layer)
        if bool(dropped.any()):
            self.death[dropped] = layer
            self.death_version += 1

    @property
    def visual_kv_share(self) -> float:
        return visual_kv_share(self.death, self.num_layers)

    def alive(self, layer: int) -> torch.Tensor:
        """[V] bool: the visual tokens layer ``layer`` computes."""
        return self.death >= layer

    # -- decode: policy layers ----------------------------------------------------------
    def push(self, name: str, first_layer: int, position: int, value: torch.Tensor | None,
             permanent: bool = False) -> None:
        """From the query at ``position`` on, layers ``>= first_layer`` read ``value`` [V] (None: all ones)
        for policy ``name``."""
        layer = self.layers.setdefault(name, PolicyLayer(first_layer, permanent))
        if (layer.first_layer, layer.permanent) != (first_layer, permanent):
            raise ValueError(f"policy layer {name!r} covers layers >= {layer.first_layer}, permanent={layer.permanent}")
        if permanent and value is not None:
            zeros = value == 0
            if layer.forever is not None:
                revived = layer.forever & ~zeros
                if bool(revived.any()):
                    raise ValueError(f"visual tokens {revived.nonzero().flatten().tolist()} are permanently evicted "
                                     f"in policy layer {name!r}")
                zeros = zeros | layer.forever
            layer.forever = zeros
        layer.history.push(position, value)

    def settle(self) -> None:
        for layer in self.layers.values():
            layer.history.settle()

    def factors(self, layer: int, position: int) -> tuple[torch.Tensor, ...]:
        """The values whose product layer ``layer`` reads for the query at ``position`` (empty: all
        ones). The same objects for the same view, so callers may cache by their identities."""
        return tuple(v for p in self.layers.values() if layer >= p.first_layer
                     for v in (p.history.at(position),) if v is not None)

    def multiplicity(self, layer: int, position: int) -> torch.Tensor | None:
        """[V] float32 the policy layers' product for the query at ``position`` at ``layer``;
        None when all ones. (Death layers are not in it: a dead token is not in the layer's cache.)"""
        return _product(self.factors(layer, position))

    def read_share(self, position: int) -> float:
        """The share of the visual tokens the query at ``position`` reads (multiplicity > 0 in the
        layer's cache), averaged over the layers. Layers that read the same factors are counted
        together: per group one count of the read tokens' death layers (host). The factors
        change only where a policy layer starts: one lookup per such range of layers."""
        if not self.num_visual:
            return 1.0
        groups: dict[tuple, tuple[tuple, list[int]]] = {}
        starts = sorted({0, *(p.first_layer for p in self.layers.values() if p.first_layer < self.num_layers)})
        for lo, hi in zip(starts, starts[1:] + [self.num_layers]):
            factors = self.factors(lo, position)
            groups.setdefault(tuple(map(id, factors)), (factors, []))[1].extend(range(lo, hi))
        read = 0
        for factors, layers in groups.values():
            death = self.death
            if factors:
                death = death[(_product(factors) > 0).cpu()]
            alive_from = torch.bincount(death, minlength=self.num_layers).flip(0).cumsum(0).flip(0)  # [L] death >= l
            read += int(alive_from[layers].sum())
        return read / (self.num_layers * self.num_visual)

    @property
    def last_position(self) -> int:
        return max((p.history.last_position for p in self.layers.values()), default=-1)

    def dead_everywhere(self) -> torch.Tensor:
        """[V] bool: tokens no layer will read again, for any later query (permanent zeros of a
        policy layer that covers every layer)."""
        out = torch.zeros(self.num_visual, dtype=torch.bool)
        for p in self.layers.values():
            if p.permanent and p.first_layer == 0 and p.forever is not None:
                out |= p.forever.cpu()
        return out


def _product(factors) -> torch.Tensor | None:
    """[V] float32 the product of a layer's policy values (None: none, all ones)."""
    out = None
    for value in factors:
        out = value.float() if out is None else out * value
    return out
