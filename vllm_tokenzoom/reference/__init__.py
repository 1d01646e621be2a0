"""Dense references: every method in plain HF transformers + torch, no vLLM. The oracle of the tests."""
