"""dsv2cli: a toolkit for DeepSeek-V2-family models (MLA + DeepSeekMoE)."""

__version__ = "0.1.0"
