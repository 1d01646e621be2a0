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
