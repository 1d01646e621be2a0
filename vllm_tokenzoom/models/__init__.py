"""Model wrappers that apply tokenzoom's pre-LLM and in-LLM stages (mirrors vllm/model_executor/models)."""
