"""What "the vLLM path equals its dense reference" means in the in-LLM methods' tests: every
trace the reference logged (each method's decisions, the layer-averaged visual KV share)
is the same in vLLM's, and so are the greedy tokens."""


def listed(x):
    """JSON's view of a trace (tuples become lists), so a child process's result compares."""
    if isinstance(x, dict):
        return {k: listed(v) for k, v in x.items()}
    return [listed(v) for v in x] if isinstance(x, (list, tuple)) else x


def assert_matches(got: dict, ref) -> None:
    """got: an offline result (``run_offline(..., trace=True)``); ref: a ``ReferenceOutput``."""
    for name, trace in ref.traces.items():
        assert listed(got["traces"][name]) == listed(trace), name
    assert got["tokens"] == ref.tokens


def cached_reference(dense):
    """``of(request, **policies)``: ``dense``'s output for an offline request dict (its video,
    ``max_tokens``) under those policies, computed once per test module."""
    from vllm_tokenzoom.testing.offline import load_video
    from vllm_tokenzoom.testing.video import chat_prompt

    cache, prompt = {}, chat_prompt(dense.processor.tokenizer)

    def of(request, **policies):
        key = (tuple(sorted(request.items())), tuple(sorted((k, repr(v)) for k, v in policies.items())))
        if key not in cache:
            cache[key] = dense.generate(load_video(request), prompt, max_new_tokens=request["max_tokens"], **policies)
        return cache[key]

    return of
