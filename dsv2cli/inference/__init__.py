"""Inference: tokenizer and chat template, sampling, and the generation engine (token ids in, records out)."""
