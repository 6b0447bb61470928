"""Suite-wide set-up.

The whole suite runs in one process with 8 fake CPU devices. XLA reads the flag once, when
jax initializes its backend, so it is set here, before any test module imports jax. Unit
tests still place arrays on one device (jax's default); sharding tests build meshes over all
eight and fail (not skip) if they are missing.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
