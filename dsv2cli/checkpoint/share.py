"""The part of each tensor one process reads when a model is split across processes.

The loaders and the memory check read whole tensors unless they are given a :class:`Share`.
``parallel/plan.py``'s ``ShardPlan`` (one rank's slices) is the implementation; it is described here
as a protocol so that ``checkpoint`` never imports ``parallel``.
"""

from __future__ import annotations

from typing import Protocol


class TensorSlice(Protocol):
    """Elements ``[start, stop)`` of dimension ``dim`` of a tensor."""

    @property
    def dim(self) -> int: ...

    @property
    def size(self) -> int: ...

    def index(self) -> tuple[slice, ...]:
        """An index selecting the slice (for ``tensor[...]`` and safetensors ``get_slice``)."""
        ...


class Share(Protocol):
    """What process ``rank`` of ``world_size`` holds: a block of routed experts and a slice of split tensors."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def experts(self) -> tuple[int, int]:
        """The routed experts ``[first, stop)`` this process holds."""
        ...

    def split_for(self, name: str) -> TensorSlice | None:
        """The slice of the dsv2 tensor ``name`` this process holds, or None when it holds all of it.

        In stored units: a packed int4 weight's input columns as bytes (two inputs each), its scale's as groups.
        """
        ...

    def local_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this process's part of ``name`` (of full shape ``shape``)."""
        ...
