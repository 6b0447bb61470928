"""Sharding tests need the 8 fake CPU devices that tests/conftest.py requests."""

import jax
import pytest


@pytest.fixture(autouse=True, scope="session")
def _eight_devices():
    n = jax.device_count()
    if n != 8:
        pytest.fail(
            f"sharding tests need 8 devices, found {n}: XLA_FLAGS must contain "
            "--xla_force_host_platform_device_count=8 before jax is imported "
            "(tests/conftest.py sets it; run pytest from the repository root)",
            pytrace=False,
        )
