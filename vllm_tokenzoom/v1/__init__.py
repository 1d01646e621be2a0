"""Extensions of vLLM's v1 engine; the tree mirrors ``vllm/v1``."""
