"""Checkpoint I/O: the HF key table, file checks, loading (and later download and conversion)."""
