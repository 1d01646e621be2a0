"""What the sessions report after a step, on the model runner's output (worker -> scheduler ->
front end): blocks that became reclaimable, the policies' results for the caller (VOA's
keyframes), and the figures the metrics count. Attached by the ``sample_tokens`` patch
(``patches._patch_model_runner``)."""
from __future__ import annotations

from vllm_tokenzoom.v1.worker.sessions import SESSIONS, RequestSession


def attach_reports(runner, output) -> None:
    """Put this step's reports on ``output`` (extra attributes, which survive the pickled transport
    to the engine core; under async scheduling on the output it wraps; vLLM's shared
    EMPTY_MODEL_RUNNER_OUTPUT is never touched). Sync scheduling: the after-sampling policies
    decide first, the sampled tokens being on the host."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput, ModelRunnerOutput

    from vllm_tokenzoom.v1.core.sched.scheduler import FIGURES_ATTR, REPORT_ATTR, RESULTS_ATTR

    target = output._model_runner_output if isinstance(output, AsyncModelRunnerOutput) else output
    if not SESSIONS or not isinstance(target, ModelRunnerOutput) or target is EMPTY_MODEL_RUNNER_OUTPUT:
        return
    if not runner.use_async_scheduling:
        take_sampled_now(runner.requests)
    block_size = runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    for attr, report in ((RESULTS_ATTR, collect_results(runner.requests)),
                         (REPORT_ATTR, collect_reclaimable(runner.requests, block_size)),
                         (FIGURES_ATTR, collect_figures(runner.requests, set(runner.input_batch.req_ids)))):
        if report:
            setattr(target, attr, report)


def collect_figures(requests: dict, in_batch) -> dict[str, dict]:
    """req_id -> the figures of its session since the last step (worker -> scheduler -> front end).
    Each request of this step's batch (``in_batch``) that ran a decode query with a decode policy
    adds the share of its visual tokens that query read (the one that sampled its newest token)."""
    out = {}
    for rid, session in SESSIONS.items():
        state = requests.get(rid)
        if state is None:
            continue
        if session.decode and len(state.output_token_ids) >= 2 and rid in in_batch:
            session.figures.read_shares.append(
                session.view.read_share(session.num_prompt_tokens + len(state.output_token_ids) - 2))
        figures = session.figures.take()
        if figures is not None:
            figures["decode"] = "+".join(session.decode) or "none"  # the label of its decode figures
            out[rid] = figures
    return out


def reclaimable_blocks(session: RequestSession, num_computed_tokens: int, block_size: int) -> list[int]:
    """Logical blocks of computed tokens that no layer will read again (DESIGN.md §4.4), not
    reported yet. Marks them reported."""
    full = num_computed_tokens // block_size
    dead = session.view.dead_everywhere()
    if full == 0 or not bool(dead.any()):
        return []
    used = session.layout.blocks_in_use(dead, num_computed_tokens, block_size)
    blocks = [j for j in range(full) if j not in used and j not in session.reported_blocks]
    session.reported_blocks.update(blocks)
    return blocks


def take_sampled_now(requests: dict) -> None:
    """Right after sampling (sync scheduling: the tokens are on the host): the after-sampling
    policies' kept queries are scored if their tokens call for it, while the cache still holds
    what the forward read; the policies with a result for the caller decide now, so a request
    that ends with this token still has it."""
    for rid, session in SESSIONS.items():
        state = requests.get(rid)
        if session.sampled_scores and state is not None:
            session.take_sampled(state.output_token_ids, reporting_only=True)


def collect_results(requests: dict) -> dict[str, dict]:
    """req_id -> {policy: result} newly available (worker -> scheduler -> the request's output)."""
    out = {}
    for rid, session in SESSIONS.items():
        if rid in requests:
            results = session.take_results()
            if results:
                out[rid] = results
    return out


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
            session.figures.blocks_reclaimed += len(blocks)
    return report
