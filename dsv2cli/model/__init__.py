"""Pure PyTorch DeepSeek-V2: no file I/O, no printing, no globals, no torch.distributed.

Modules, bottom to top (a module imports only from those before it; no imports inside functions):

    dtypes, options, norm, rope, cache  <  fusion  <  moe, attention  <  quantized  <  transformer

``options`` holds :class:`ForwardOptions` (which of dsv2's C++ kernels a forward may use), ``fusion`` the
stacked projections (an int8 linear class declares its own stacked product), ``quantized`` the int8
transform applied to a built model, ``transformer`` the decoder and ``fuse_projections``.
"""

from dsv2cli.model.cache import LatentKVCache
from dsv2cli.model.moe import RoutingDecision, RoutingHook
from dsv2cli.model.options import ForwardOptions
from dsv2cli.model.transformer import DeepseekV2, fuse_projections

__all__ = ["DeepseekV2", "ForwardOptions", "LatentKVCache", "RoutingDecision", "RoutingHook", "fuse_projections"]
