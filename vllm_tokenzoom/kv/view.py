"""Per request and per layer group, a multiplicity per token position (DESIGN.md §4.2).

Attention reads position ``p`` with weight proportional to ``m[p] * exp(q . k_p)``:
``m = 0`` evicts, ``1`` is normal, ``k`` counts the token k times (a logit bias of
``log k``), and setting ``m`` above 0 again revives it. KV never moves and positions
are never renumbered.

Index space: *token positions* only (vLLM's position = RoPE position). Policies speak
in visual indices; mapping those to positions happens before a plan is built.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVPlan:
    """Set ``m[positions] = values`` in one layer group, after resetting it to all-ones if
    ``reset``. ``permanent``: the positions set to 0 are dead for good in that group (never
    revived; once a whole block is dead in every group, its memory can be given back).
    Built by pure functions; :meth:`TokenView.apply` carries it out."""

    group: int
    positions: torch.Tensor  # [n] int64 token positions
    values: torch.Tensor  # [n] float32 multiplicities, >= 0
    reset: bool = False
    permanent: bool = False

    def __post_init__(self):
        if self.positions.shape != self.values.shape or self.positions.dim() != 1:
            raise ValueError(f"positions {tuple(self.positions.shape)} and values {tuple(self.values.shape)} must be equal 1-D")
        if self.values.numel() and float(self.values.min()) < 0:
            raise ValueError("multiplicities must be >= 0")


class TokenView:
    """The multiplicities of one request. Layer group ``g`` covers layers
    ``[group_starts[g], group_starts[g + 1])``; group 0 starts at layer 0.

    Every plan is applied *at* a token position: the view in force for the query at
    that position and later ones. The history lets a recomputation (after preemption)
    give each query the view it had: :meth:`at`.
    """

    def __init__(self, group_starts: tuple[int, ...] = (0,)):
        if not group_starts or group_starts[0] != 0 or list(group_starts) != sorted(set(group_starts)):
            raise ValueError(f"group starts must be increasing from 0, got {group_starts}")
        self.group_starts = tuple(group_starts)
        self._m: list[torch.Tensor | None] = [None] * len(group_starts)  # None: all ones
        self._dead: list[torch.Tensor] = [torch.zeros(0, dtype=torch.bool) for _ in group_starts]
        self.history: list[tuple[int, KVPlan]] = []  # (query position, plan), in order
        self.version = 0  # bumped by every plan: lets readers cache what they derive from the view

    def group_of(self, layer: int) -> int:
        return bisect.bisect_right(self.group_starts, layer) - 1

    def multiplicity(self, layer: int, length: int) -> torch.Tensor | None:
        """[length] float32 multiplicities of positions ``0..length-1`` for ``layer``;
        ``None`` when they are all 1 (positions never planned are 1)."""
        m = self._m[self.group_of(layer)]
        if m is None:
            return None
        if m.numel() >= length:
            return m[:length]
        return torch.cat((m, torch.ones(length - m.numel())))

    @property
    def last_position(self) -> int:
        """Position of the query the last plan was applied at (-1: none)."""
        return self.history[-1][0] if self.history else -1

    def at(self, position: int) -> "TokenView":
        """The view as it was for the query at ``position``."""
        if position >= self.last_position:
            return self
        view = TokenView(self.group_starts)
        for at, plan in self.history:
            if at > position:
                break
            view.apply(plan, at)
        return view

    def apply(self, plan: KVPlan, at_position: int) -> None:
        if at_position < self.last_position:
            raise ValueError(f"plans apply in position order: {at_position} after {self.last_position}")
        dead = self._dead[plan.group]
        revived = plan.positions[(plan.positions < dead.numel()) & (plan.values > 0)]
        if revived.numel() and bool(dead[revived].any()):
            raise ValueError(f"positions {revived[dead[revived]].tolist()} are permanently evicted in group {plan.group}")
        self.history.append((at_position, plan))
        self.version += 1
        group = plan.group
        m = None if plan.reset else self._m[group]
        needed = max(int(plan.positions.max()) + 1 if plan.positions.numel() else 0, dead.numel())
        if plan.positions.numel() or (plan.reset and dead.any()):
            m = torch.ones(needed) if m is None else torch.cat((m, torch.ones(max(needed - m.numel(), 0))))
            m[plan.positions] = plan.values.float()
            m[:dead.numel()][dead] = 0.0  # a reset never revives the dead
        if plan.permanent and plan.positions.numel():
            grown = torch.zeros(needed, dtype=torch.bool)
            grown[:dead.numel()] = dead
            grown[plan.positions[plan.values == 0]] = True
            self._dead[group] = grown
        self._m[group] = None if m is None or bool((m == 1).all()) else m

    def dead_everywhere(self, length: int) -> torch.Tensor:
        """[length] bool: positions permanently evicted in every layer group."""
        out = torch.ones(length, dtype=torch.bool)
        for dead in self._dead:
            padded = torch.zeros(length, dtype=torch.bool)
            padded[:min(length, dead.numel())] = dead[:length]
            out &= padded
        return out

    @property
    def modified(self) -> bool:
        return any(m is not None for m in self._m)
