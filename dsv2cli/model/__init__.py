"""Pure PyTorch DeepSeek-V2: no file I/O, no printing, no globals, no torch.distributed."""

from dsv2cli.model.cache import LatentKVCache
from dsv2cli.model.moe import RoutingDecision, RoutingHook
from dsv2cli.model.transformer import DeepseekV2

__all__ = ["DeepseekV2", "LatentKVCache", "RoutingDecision", "RoutingHook"]
