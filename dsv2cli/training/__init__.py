"""Training a DeepSeek-V2-architecture model from scratch: data, tokenizer, balance losses, token dropping, checkpoints.

Imports only from packages before it (config, model, checkpoint, analysis); the CLI (`dsv2 train`) calls
:func:`dsv2cli.training.trainer.train`.
"""
