"""Suite-wide hooks: the ``needs_kernels`` mark (tests/helpers.py), which skips, or fails under DSV2_REQUIRE_KERNELS=1."""

import pytest

from tests.helpers import skip_without_kernels


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_kernels(available, reason): skip unless available; fail instead under DSV2_REQUIRE_KERNELS=1"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_kernels"):
        if not mark.kwargs["available"]:
            skip_without_kernels(mark.kwargs["reason"])
