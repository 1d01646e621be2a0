"""Block reclamation: a mixin over vLLM's schedulers (sync ``Scheduler`` and
``AsyncScheduler``) that gives back whole KV blocks of *running* requests (DESIGN.md §4.4).

The worker reports, on its ``ModelRunnerOutput`` (``tokenzoom_free_blocks``: request id ->
logical block indices), blocks whose every token is permanently evicted in every layer.
The mixin replaces each with vLLM's null block in the request's block list and frees it,
as vLLM does for sliding-window layers (``SingleTypeKVCacheManager.remove_skipped_blocks``):
logical indices stay aligned, later allocations keep working, and the pool can hand the
block to any request. The freeing request never reads those positions again (its view
says so), so its output does not change.

Async scheduling: a report is processed when step N's output arrives; the block can be
allocated from the next schedule on, while only the freeing request's own steps may still
be in flight, and those never read it. No deferred-free fence is needed.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("vllm.tokenzoom")
REPORT_ATTR = "tokenzoom_free_blocks"
RESULTS_ATTR = "tokenzoom_results"  # request id -> {policy: result}, handed to the request's output
RESULTS_KEY = "tokenzoom"  # ... under this key of its ``kv_transfer_params``
FIGURES_ATTR = "tokenzoom_figures"  # request id -> its session's figures of the step (sessions.Figures)
FIGURES_KEY = "figures"  # ... under RESULTS_KEY; the front end counts them (metrics.py)


_FREED_KEEP = 4096  # the log of freed blocks keeps the most recent ones only (a server runs for long)


class TokenZoomSchedulerMixin:
    # (request id, logical block, physical block id) of the most recent blocks freed, for tests and logs
    tokenzoom_freed: list[tuple[str, int, int]]

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        results = getattr(model_runner_output, RESULTS_ATTR, None)
        if results:
            _attach_results(outputs, results)
        figures = getattr(model_runner_output, FIGURES_ATTR, None)
        if figures or getattr(self, "_tokenzoom_pending", None):
            self._tokenzoom_pending = _attach_figures(outputs, figures or {}, getattr(self, "_tokenzoom_pending", {}),
                                                      self.requests)
        report = getattr(model_runner_output, REPORT_ATTR, None)
        if report:
            for req_id, logical_blocks in report.items():
                self._tokenzoom_free_blocks(req_id, logical_blocks)
        return outputs

    def _tokenzoom_free_blocks(self, req_id: str, logical_blocks: list[int]) -> None:
        request = self.requests.get(req_id)
        if request is None or request.is_finished():
            return  # finished meanwhile: vLLM frees all of its blocks anyway
        pool = self.kv_cache_manager.block_pool
        freed = []
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            blocks = manager.req_to_blocks.get(req_id, [])
            for j in logical_blocks:
                if j < len(blocks) and not blocks[j].is_null:
                    freed.append((j, blocks[j]))
                    blocks[j] = pool.null_block
        if not freed:
            return
        pool.free_blocks(block for _, block in freed)
        if not hasattr(self, "tokenzoom_freed"):
            self.tokenzoom_freed = []
        self.tokenzoom_freed += [(req_id, j, block.block_id) for j, block in freed]
        del self.tokenzoom_freed[:-_FREED_KEEP]
        logger.debug("tokenzoom freed blocks %s of %s", [b.block_id for _, b in freed], req_id)


def _attach_results(outputs, results: dict[str, dict]) -> None:
    """Policies' results for the caller (VOA's keyframes) ride on the request's output of this
    step, in ``kv_transfer_params`` (vLLM's per-request channel from the engine core to the
    ``RequestOutput``; a KV connector's own params are kept)."""
    for engine_outputs in outputs.values():
        for out in engine_outputs.outputs:
            if out.request_id in results:
                out.kv_transfer_params = {**(out.kv_transfer_params or {}), RESULTS_KEY: results[out.request_id]}


def _attach_figures(outputs, figures: dict[str, dict], pending: dict[str, list], requests) -> dict[str, list]:
    """Each request's figures ride on its next output (``kv_transfer_params[RESULTS_KEY][FIGURES_KEY]``,
    a list of the steps' figures); a step that gave the request no output (a prefill chunk) keeps
    them pending. Pending figures of a request the scheduler no longer holds (aborted) are dropped.
    -> the figures still pending."""
    for rid, fig in figures.items():
        pending.setdefault(rid, []).append(fig)
    for engine_outputs in outputs.values():
        for out in engine_outputs.outputs:
            steps = pending.pop(out.request_id, None)
            if steps:
                params = dict(out.kv_transfer_params or {})
                params[RESULTS_KEY] = {**params.get(RESULTS_KEY, {}), FIGURES_KEY: steps}
                out.kv_transfer_params = params
    return {rid: steps for rid, steps in pending.items() if rid in requests}


def with_mixin(base: type) -> type:
    """``base`` (a vLLM scheduler class) with block reclamation; idempotent."""
    if issubclass(base, TokenZoomSchedulerMixin):
        return base
    return type("TokenZoom" + base.__name__, (TokenZoomSchedulerMixin, base), {})
