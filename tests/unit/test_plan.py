"""gti_jax.plan on one device: the planned FLOPs are the analytic count of each step, and a
plan that cannot fit is refused in one line naming what to change."""

from __future__ import annotations

import functools
import json

import pytest

from gti_jax.errors import ConfigError
from gti_jax.plan import build
from gti_jax.plan.__main__ import main
from gti_jax.plan.hlo import collectives, dot_flops

# Big enough that matrix multiplications dominate (see the tolerance below), small enough to
# compile in seconds on one CPU device.
HF = {
    "model_type": "llama",
    "vocab_size": 500,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}
NEW, B, T, TARGETS = 12, 8, 64, 8


def _config(tmp_path, *overrides):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF))
    return build.load_config(
        None,
        [
            f"model={path}",
            f"plan.new_tokens={NEW}",
            f"data.max_len={T}",
            f"plan.targets={TARGETS}",
            f"ground.batch_size={B}",
            f"sft.batch_size={B}",
            "sft.lora_rank=0",
            *overrides,
        ],
    )


@functools.cache
def _planned(root):
    from pathlib import Path

    cfg = _config(Path(root))
    return cfg, *build.plan_stages(cfg)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    return _planned(str(tmp_path_factory.mktemp("plan")))


def _analytic(stage: str, num_rows: int) -> float:
    """Matrix-multiplication FLOPs of one step (2 per multiply-add).

    Body parameters P (every decoder matrix) see all B x T tokens, the head [D, V] only the
    B x L target slots (the loss projects there alone), attention's two T x T products
    4 B T^2 H hd per layer forward. Full SFT: forward + both backward products (6 P BT,
    6 D V BL); attention's backward is 2x its forward for both stages. Grounding trains only
    the new rows: the backward computes activation gradients but no weight gradients (4 P BT,
    4 D V BL), plus the new rows' own logits (forward, their input gradient and their
    weight gradient: 6 D N BL).
    """
    d, f, layers = HF["hidden_size"], HF["intermediate_size"], HF["num_hidden_layers"]
    h, k = HF["num_attention_heads"], HF["num_key_value_heads"]
    hd = d // h
    body = layers * (d * h * hd * 2 + d * k * hd * 2 + 3 * d * f)
    width = 8  # target_width(TARGETS, T)
    attention = 12 * B * T * T * h * hd * layers
    if stage == "sft-full":
        return 6 * body * B * T + 6 * d * num_rows * B * width + attention
    return 4 * body * B * T + 4 * d * num_rows * B * width + 6 * d * NEW * B * width + attention


# XLA's count also holds the elementwise work that the analytic count leaves out: per token
# RMSNorm, RoPE, softmax, SiLU and the loss's logsumexp (~1.5% of the matmuls at D=128), per
# trained parameter AdamW, its clipping and the finiteness guard (~25 operations: ~1% of
# 6 x 512 tokens). So the planned count is at least the analytic one and within 4% of it.
@pytest.mark.parametrize("stage", ["ground", "sft-full"])
def test_planned_flops_are_the_analytic_count(planned, stage):
    cfg, about, stages = planned
    plan = {s.stage: s for s in stages}[stage]
    want = _analytic(stage, about["num_rows"])
    assert want <= plan.flops <= 1.04 * want, (plan.flops, want)


def test_a_plan_on_one_device_has_no_collectives_and_counts_its_state(planned):
    cfg, about, stages = planned
    assert about["devices"] == 1 and about["num_rows"] == 512  # 500 + 12 padded to 64
    ground, sft = stages
    assert ground.batch == sft.batch == (B, T, 8) and ground.batch_bytes == 4 * B * (3 * T + 8)
    assert ground.collectives == [] and sft.collectives == []
    d, rows = HF["hidden_size"], about["num_rows"]
    # grounding trains [N, D] embedding rows and [N, D] head rows; Adam keeps two moments
    assert ground.trainable_params == 2 * NEW * d
    assert ground.opt_bytes >= 2 * 4 * ground.trainable_params
    # full SFT trains everything (float32): the decoder, its norms, the embedding and the head
    body = HF["num_hidden_layers"] * (d * d * 2 + d * d + 3 * d * 512 + 2 * d) + d
    assert sft.trainable_params == body + 2 * rows * d
    assert sft.param_bytes == 4 * sft.trainable_params
    assert sft.peak_bytes >= sft.param_bytes + sft.opt_bytes + sft.temp_bytes


@pytest.mark.slow  # another compile of the full step (about 30 s of CPU)
def test_gradient_accumulation_counts_every_micro_batch(tmp_path, planned):
    """XLA counts a loop body once; the plan adds the matrix multiplications of its other
    trips. Two micro-batches of B/2 rows cost what one batch of B rows does, up to the
    elementwise work of the second trip (norms, softmax, SiLU: under 1% here)."""
    cfg = _config(tmp_path, "sft.grad_accum=2", "ground.steps=0")
    _, stages = build.plan_stages(cfg)
    once = {s.stage: s for s in planned[2]}["sft-full"]
    assert stages[0].flops == pytest.approx(once.flops, rel=0.01)


@pytest.mark.slow  # three more compiles (about 30 s of CPU)
def test_sampled_layers_extrapolate_to_the_whole_model(tmp_path):
    """Layers are unrolled and identical: parameters, optimizer state and FLOPs grow exactly
    linearly with depth; XLA's temporaries nearly so (buffer packing: within 2%)."""
    deep = ["model=" + str(tmp_path / "config.json"), "sft.steps=0"]
    (tmp_path / "config.json").write_text(json.dumps({**HF, "num_hidden_layers": 3}))
    whole = build.plan_stages(build.load_config(None, [*_overrides_of(deep)]))[1][0]
    about, (sampled,) = build.plan_stages(
        build.load_config(None, [*_overrides_of(deep), "plan.sample_layers=1"])
    )
    assert about["sampled_layers"] == [1, 2]
    for f in ("trainable_params", "param_bytes", "opt_bytes", "batch_bytes"):
        assert getattr(sampled, f) == getattr(whole, f), f
    assert sampled.flops == pytest.approx(whole.flops, rel=1e-6)
    assert sampled.peak_bytes == pytest.approx(whole.peak_bytes, rel=0.02)


def _overrides_of(extra):
    base = [f"plan.new_tokens={NEW}", f"data.max_len={T}", f"ground.batch_size={B}"]
    return [*base, *extra]


def test_a_plan_that_does_not_fit_is_refused_in_one_line(planned):
    cfg, _, stages = planned
    small = build.load_config(None, [*_overrides(cfg), "plan.hbm_gib=0.001"])
    with pytest.raises(build.PlanError) as e:
        build.check_fits(small, stages)
    msg = str(e.value)
    assert "\n" not in msg and "GiB per device" in msg
    for fix in ("compute.remat=full", "sft.grad_accum=2", "compute.loss_chunk"):
        assert fix in msg or fix.replace("sft", "ground") in msg
    build.check_fits(cfg, stages)  # 16 GiB: fits


def _overrides(cfg):
    return [
        f"model={cfg.model}",
        f"plan.new_tokens={NEW}",
        f"data.max_len={T}",
        f"ground.batch_size={B}",
        f"sft.batch_size={B}",
        "sft.lora_rank=0",
    ]


def test_the_command_refuses_with_exit_code_2(tmp_path, capsys):
    cfg = _config(tmp_path)
    rc = main(
        [
            *_overrides(cfg),
            "sft.steps=0",
            "plan.hbm_gib=0.001",
            "plan.output=" + str(tmp_path / "p.json"),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: the ground step needs")
    assert "estimated step on tpu-v5e" in out
    assert json.loads((tmp_path / "p.json").read_text())["stages"][0]["stage"] == "ground"


def test_bad_plans_are_refused_before_compiling(tmp_path):
    with pytest.raises(build.PlanError, match="plan.devices"):
        build.devices_needed(build.load_config(None, ["mesh.shape={data: -1}"]))
    with pytest.raises(build.PlanError, match="plan.new_tokens"):
        build.rows_for(build.load_config(None, []), HF, 500, mesh=None, rules={})
    with pytest.raises(build.PlanError, match="name a shape"):
        build.model_shape(str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="accelerator"):
        build.load_config(None, ["plan.accelerator=tpu-v9"])


def test_hlo_reader_counts_loops_and_groups():
    text = """
%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ag = f32[32,16]{1,0} all-gather(%d), replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %d)
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %w = (s32[], f32[8,16]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %rs = f32[2,16]{1,0} reduce-scatter(%a), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
}
"""
    got = {c.kind: c for c in collectives(text, 8)}
    assert (got["all-gather"].operand_bytes, got["all-gather"].group_size) == (512, 4)
    assert got["all-gather"].count == 3 and got["all-gather"].traffic_bytes == 3 * 3 * 512
    assert got["reduce-scatter"].count == 1 and got["reduce-scatter"].traffic_bytes == 0.75 * 512
    assert dot_flops(text) == (3 * 2 * 8 * 16 * 16, 2 * 8 * 16 * 16)
