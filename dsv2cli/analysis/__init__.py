"""Analysis on configs and recorded runs: parameter counts, KV-cache arithmetic, expert statistics."""
