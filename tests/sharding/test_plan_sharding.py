"""gti_jax.plan on 8 fake devices: what it plans per device is what the trainer's steps
allocate, and what the compiled program it ran holds."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from gti_jax.models.config import LlamaConfig
from gti_jax.models.llama import LlamaForCausalLM
from gti_jax.models.sharding import shard_model
from gti_jax.plan import build
from gti_jax.train.data import Batch, target_positions
from gti_jax.train.ground import ground_step_from_config, split_new_rows
from gti_jax.train.sft import sft_model_from_config, sft_step_from_config
from gti_jax.train.steps import put_batch

# two compiles of each stage's SPMD program for 8 devices: a minute of CPU on 2 cores
pytestmark = pytest.mark.slow

HF = {
    "model_type": "llama",
    "vocab_size": 120,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}
NEW, B, T = 8, 8, 32


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "config.json"
    path.write_text(json.dumps(HF))
    cfg = build.load_config(
        None,
        [
            f"model={path}",
            f"plan.new_tokens={NEW}",
            f"data.max_len={T}",
            f"ground.batch_size={B}",
            f"sft.batch_size={B}",
            "mesh.shape={data: 2, fsdp: 2, tensor: 2}",
        ],
    )
    about, stages = build.plan_stages(cfg)
    return cfg, about, {s.stage: s for s in stages}


def _model(cfg, about):
    """The extended model as the trainer holds it: sharded by the rules on the mesh."""
    mesh = build.plan_mesh(cfg)
    config = LlamaConfig.from_hf_dict(HF).replace(vocab_size=about["num_rows"])
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    return shard_model(model, mesh, dict(cfg.mesh.rules)), mesh


def _batch(new_ids: range) -> Batch:
    """The largest bucket (T = data.max_len); a new id at position 1 so grounding
    differentiates every position (prefix 0, as planned)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, new_ids.start, size=(B, T)).astype(np.int32)
    ids[:, 1] = new_ids.start
    mask = np.zeros((B, T), np.float32)
    mask[:, T - 4 :] = 1.0
    return Batch(ids, mask, np.ones((B, T), np.int32), target_positions(list(mask), T, 8))


def _on_device0(tree) -> int:
    """Bytes the arrays of `tree` hold on the first device."""
    dev = jax.devices()[0]
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == dev
    )


def _memory(compiled) -> tuple[int, int]:
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )  # fmt: skip
    return int(m.temp_size_in_bytes), int(peak)


# Tolerance: none. The plan lowers the trainer's own jitted step on arguments of the same
# shapes, dtypes and shardings, so the arrays are the same bytes and the program the same.
def test_planned_grounding_is_what_the_trainer_allocates(planned):
    cfg, about, plans = planned
    plan = plans["ground"]
    model, mesh = _model(cfg, about)
    new_ids = range(*about["new_ids"])
    graphdef, state = nnx.split(model)
    rules = dict(cfg.mesh.rules)
    step = ground_step_from_config(
        cfg, graphdef, state, new_ids, tied=False, mesh=mesh, rules=rules
    )
    params, opt = step.init(split_new_rows(state, new_ids, tied=False))
    batch = _batch(new_ids)
    assert step.prefix_for(batch) == 0
    params, opt, _ = step(params, opt, batch)
    assert _on_device0((params, step.frozen_state)) == plan.param_bytes
    assert _on_device0(opt) == plan.opt_bytes
    placed = put_batch(batch, step.batch_sharding)
    assert _on_device0(placed) == plan.batch_bytes
    ran = step._step.lower(params, step.frozen_state, opt, placed, 0).compile()
    assert _memory(ran) == (plan.temp_bytes, plan.peak_bytes)
    assert plan.collectives  # a sharded step communicates
    assert {c["group_size"] for c in plan.collectives} <= {2, 4, 8}


def test_planned_lora_sft_is_what_the_trainer_allocates(planned):
    cfg, about, plans = planned
    plan = plans["sft-lora"]
    model, mesh = _model(cfg, about)
    model = sft_model_from_config(cfg, model)
    step = sft_step_from_config(cfg, model, mesh=mesh, rules=dict(cfg.mesh.rules))
    st = step.init(model)
    batch = _batch(range(*about["new_ids"]))
    key = jax.random.key(1)
    st, _ = step(st, batch, key)
    assert _on_device0((st.trainable, st.frozen)) == plan.param_bytes
    assert _on_device0(st.opt_state) == plan.opt_bytes
    placed = put_batch(batch, step.batch_sharding)
    ran = step._step.lower(st.trainable, st.frozen, st.opt_state, placed, key).compile()
    assert _memory(ran) == (plan.temp_bytes, plan.peak_bytes)
    lora = sum(x.size for x in jax.tree.leaves(st.trainable))
    assert plan.trainable_params == lora
