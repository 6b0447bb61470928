"""The Llama model on a (data 2, fsdp 2, tensor 2) mesh of 8 fake CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gti_jax.io.safetensors import load_dir_tensors
from gti_jax.models import LlamaConfig, LlamaForCausalLM, model_from_tensors
from gti_jax.models.sharding import (
    LOGICAL_RULES,
    MeshError,
    cache_shardings,
    create_sharded_model,
    logical_to_spec,
    make_mesh,
    shard_model,
    state_shardings,
)
from tests.helpers.hf_models import make_tiny_hf_model

# SPMD programs over 8 fake devices: minutes of compiling on 2 cores
pytestmark = pytest.mark.slow

AXES = {"data": 2, "fsdp": 2, "tensor": 2}
_forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))
_prefill = nnx.jit(lambda m, ids, mask, cache: m(ids, attention_mask=mask, cache=cache))
_step = nnx.jit(lambda m, ids, cache: m(ids, cache=cache))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(AXES)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in ("llama", "qwen2"):
        path = make_tiny_hf_model(root, family, seed=2)
        out[family] = (LlamaConfig.from_json_file(path / "config.json"), load_dir_tensors(path))
    return out


def _batch(vocab):
    rng = np.random.default_rng(3)
    ids = rng.integers(3, vocab, size=(4, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def test_make_mesh_checks_device_count():
    with pytest.raises(MeshError, match="needs 6 devices but 8 are available"):
        make_mesh({"data": 3, "tensor": 2})
    assert make_mesh({"data": -1, "tensor": 2}).shape == {"data": 4, "tensor": 2}
    assert make_mesh(AXES).axis_names == ("data", "fsdp", "tensor")


def test_logical_to_spec_rules(mesh):
    assert logical_to_spec(("vocab", "embed"), LOGICAL_RULES, mesh, (384, 32)) == P(
        "tensor", "fsdp"
    )
    # Not divisible by the tensor axis: that dimension is replicated, the other still shards.
    assert logical_to_spec(("vocab", "embed"), LOGICAL_RULES, mesh, (375, 32)) == P(None, "fsdp")
    assert logical_to_spec(("batch", None), LOGICAL_RULES, mesh, (8, 3)) == P(
        ("data", "fsdp"), None
    )
    # Size-1 mesh axes and axes missing from the mesh are dropped.
    small = make_mesh({"data": 8, "fsdp": 1})
    assert logical_to_spec(("vocab", "embed"), LOGICAL_RULES, small, (384, 32)) == P(None, None)
    # A mesh axis is used at most once per array.
    rules = {"vocab": ("fsdp", "tensor"), "embed": "tensor"}
    assert logical_to_spec(("vocab", "embed"), rules, mesh, (384, 32)) == P(
        ("fsdp", "tensor"), None
    )
    assert logical_to_spec(("unknown",), LOGICAL_RULES, mesh, (8,)) == P(None)


EXPECTED = {
    # family -> path -> (spec, per-device shard shape)
    "qwen2": {
        ("embed", "embedding"): (P("tensor", "fsdp"), (192, 16)),
        ("lm_head", "kernel"): (P("fsdp", "tensor"), (16, 192)),
        ("layers", 0, "self_attn", "q_proj", "kernel"): (P("fsdp", "tensor", None), (16, 2, 8)),
        ("layers", 0, "self_attn", "q_proj", "bias"): (P("tensor", None), (2, 8)),
        ("layers", 1, "self_attn", "k_proj", "kernel"): (P("fsdp", "tensor", None), (16, 1, 8)),
        ("layers", 1, "self_attn", "o_proj", "kernel"): (P("tensor", None, "fsdp"), (2, 8, 16)),
        ("layers", 0, "mlp", "gate_proj", "kernel"): (P("fsdp", "tensor"), (16, 32)),
        ("layers", 0, "mlp", "down_proj", "kernel"): (P("tensor", "fsdp"), (32, 16)),
        ("layers", 0, "input_layernorm", "scale"): (P(None), (32,)),
        ("norm", "scale"): (P(None), (32,)),
    },
    "llama": {
        # 375 rows do not split over tensor=2: the vocab dimension is replicated.
        ("embed", "embedding"): (P(None, "fsdp"), (375, 16)),
        ("layers", 0, "mlp", "up_proj", "kernel"): (P("fsdp", "tensor"), (16, 32)),
    },
}


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_loaded_directly_sharded_matches_single_device(ckpts, mesh, family):
    config, tensors = ckpts[family]
    single = model_from_tensors(config, tensors)
    sharded = model_from_tensors(config, tensors, mesh=mesh)
    flat = dict(nnx.to_flat_state(nnx.state(sharded, nnx.Param)))
    for path, (spec, shard_shape) in EXPECTED[family].items():
        arr = flat[path][...]
        assert isinstance(arr.sharding, NamedSharding) and arr.sharding.mesh == mesh, path
        assert arr.sharding.spec == spec, (path, arr.sharding.spec)
        assert arr.addressable_shards[0].data.shape == shard_shape, path
    assert not hasattr(sharded, "lm_head") if config.tie_word_embeddings else True
    for path, var in flat.items():  # every parameter lives on the mesh
        assert var[...].sharding.mesh == mesh, path

    ids, mask = _batch(config.vocab_size)
    ref = np.asarray(_forward(single, jnp.asarray(ids), jnp.asarray(mask)))
    batch = NamedSharding(mesh, logical_to_spec(("batch", None), LOGICAL_RULES, mesh, ids.shape))
    out = _forward(
        sharded, jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(mask), batch)
    )
    assert out.shape == ref.shape
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=1e-5)


def test_sharded_decoding_matches_single_device(ckpts, mesh):
    config, tensors = ckpts["qwen2"]
    models = [model_from_tensors(config, tensors), model_from_tensors(config, tensors, mesh=mesh)]
    ids, mask = _batch(config.vocab_size)
    results = []
    for i, model in enumerate(models):
        cache = model.init_cache(4, ids.shape[1] + 4)
        if i:  # the sharded model gets a cache sharded over batch and kv heads
            cache = jax.device_put(cache, cache_shardings(cache, mesh))
            assert cache.k[0].sharding.spec == P(("data", "fsdp"), None, "tensor", None)
        logits, cache = _prefill(model, jnp.asarray(ids), jnp.asarray(mask), cache)
        tokens = [jnp.argmax(logits[:, -1], -1)]
        for _ in range(3):
            logits, cache = _step(model, tokens[-1][:, None], cache)
            tokens.append(jnp.argmax(logits[:, 0], -1))
        results.append((np.stack(tokens, 1), np.asarray(logits)))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-5)


def test_create_and_reshard_by_rules(ckpts, mesh):
    config, _ = ckpts["qwen2"]
    make = lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    created = create_sharded_model(make, mesh)
    emb = created.embed.embedding[...]
    assert emb.sharding.spec == P("tensor", "fsdp")
    plain = make()
    np.testing.assert_allclose(np.asarray(emb), np.asarray(plain.embed.embedding[...]), rtol=1e-6)

    # Re-sharding is editing the rules: vocab over fsdp x tensor, embed replicated.
    rules = {**LOGICAL_RULES, "vocab": ("fsdp", "tensor"), "embed": None}
    resharded = shard_model(plain, mesh, rules)
    emb = resharded.embed.embedding[...]
    assert emb.sharding.spec == P(("fsdp", "tensor"), None)
    assert emb.addressable_shards[0].data.shape == (96, 32)
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(plain.embed.embedding[...]))
    # The shardings tree matches the model state one to one.
    shardings = state_shardings(resharded, mesh, rules)
    for (path, s), (_, v) in zip(
        nnx.to_flat_state(shardings), nnx.to_flat_state(nnx.state(resharded)), strict=True
    ):
        assert v[...].sharding.spec == s.get_value().spec, path


def test_sharded_export_streams_the_same_bytes(ckpts, mesh, tmp_path):
    """A model sharded over 8 devices exports (tensor by tensor, cast on the devices) the
    very same files as the model on one device, in float32 and in bfloat16."""
    from gti_jax.models import export_hf_dir

    config, tensors = ckpts["qwen2"]
    single = model_from_tensors(config, tensors)
    sharded = model_from_tensors(config, tensors, mesh=mesh)
    for dtype in (None, jnp.bfloat16):
        a = export_hf_dir(single, None, None, tmp_path / f"one-{dtype}", dtype=dtype)
        b = export_hf_dir(sharded, None, None, tmp_path / f"eight-{dtype}", dtype=dtype)
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes(), (dtype, name)


def test_sharded_beam_search_matches_single_device(ckpts, mesh):
    """Constrained beam search and greedy decoding on the sharded model, prompts over the
    batch axes, give the single-device results (rows split 4 ways: data x fsdp)."""
    from gti_jax.models.decode import DecodeError, TrieConstraint, beam_search, generate
    from gti_jax.train.steps import batch_sharding

    config, tensors = ckpts["qwen2"]
    single = model_from_tensors(config, tensors)
    sharded = model_from_tensors(config, tensors, mesh=mesh)
    rows = batch_sharding(mesh)
    assert rows.spec[0] == ("data", "fsdp")
    prompts = [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14]]
    trie = TrieConstraint.from_sequences([[20, 21], [20, 22], [23, 24], [25]], eos_id=2)
    kw = dict(num_beams=3, max_new_tokens=3, constraint=trie)
    want = beam_search(single, prompts, **kw)
    got = beam_search(sharded, prompts, batch_sharding=rows, **kw)
    assert got.sequences == want.sequences
    # float32 reductions in another order: the scores agree to rounding
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)
    want = generate(single, prompts, max_new_tokens=3)
    got = generate(sharded, prompts, max_new_tokens=3, batch_sharding=rows)
    assert got.sequences == want.sequences
    with pytest.raises(DecodeError, match="do not split evenly"):
        beam_search(sharded, prompts[:3], batch_sharding=rows, **kw)
