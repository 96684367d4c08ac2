"""Sampling crystals from a fine-tuned LLM: batched llama.cpp (default) or transformers, grammar-constrained."""

from crystal_cli.sampling.generate import BACKENDS, GenerateOptions, GenerateSummary, check_options, generate, infill

__all__ = ["BACKENDS", "GenerateOptions", "GenerateSummary", "check_options", "generate", "infill"]
