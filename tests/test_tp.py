"""Tensor parallelism 2 on this CPU (one core per rank: ``VLLM_CPU_OMP_THREADS_BIND='0|1'``):
a batch holding every method gives the same greedy tokens as TP=1, and the same in-LLM figures
(rows skipped, the share each decode step read). The ranks decide from all-reduced attention
(``indexed._all_heads``); a rank deciding otherwise would change its heads' rows, and so the
tokens. The README's "0-1" binding is for one process; TP needs a range per rank."""
from vllm_tokenzoom.testing.offline import run_offline

ENGINE = {"tokenzoom": {"preset": "dycoke", "per_request": ["ttm", "dp", "fastv", "vas", "ata", "voa"]}}
VIDEO = dict(frames=8, max_tokens=6)
BATCH = [
    dict(VIDEO, seed=70),  # the engine's dycoke (ttm + dp)
    dict(VIDEO, seed=71, tokenzoom={"methods": {"ttm": {"prune_ratio": 0.5}}}),
    dict(VIDEO, seed=72, tokenzoom={"preset": "fastv"}),
    dict(VIDEO, seed=73, tokenzoom={"preset": "vas"}),
    dict(VIDEO, seed=74, tokenzoom={"preset": "cascade"}),
    dict(VIDEO, seed=75, tokenzoom={"methods": {"ata": {"every": 1, "copies": 20, "drops": 20}}}),
    dict(frames=16, seed=76, max_tokens=24, tokenzoom={"methods": {"voa": {}}}),
]


def test_every_method_under_tensor_parallelism_answers_as_one_rank(tiny_deep_model):
    one = run_offline(tiny_deep_model, BATCH, ENGINE, batch=True)["outputs"]
    two = run_offline(tiny_deep_model, BATCH, ENGINE, batch=True, llm_kwargs={"tensor_parallel_size": 2},
                      env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})["outputs"]
    assert [o["tokens"] for o in two] == [o["tokens"] for o in one]

    def decided(o):
        f = o["figures"] or {}
        return {k: v for k, v in f.items() if k != "policy_seconds"}

    assert [decided(o) for o in two] == [decided(o) for o in one]
    assert one[3]["figures"]["prefill_visual_rows_skipped"] > 0  # VAS dropped, and both agreed where
