"""Offline test assets: tiny LLaVA-OneVision checkpoints and synthetic videos."""
