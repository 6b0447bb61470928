"""The prepared accelerator check (issue 14 item 6): parity, step speed, MFU, beam search.

One run on one accelerator (or, with ``--cpu``, the same code at tiny sizes on the CPU) that:

1. checks parity: a tiny random Qwen3-style model (GQA, q/k norms) and a tiny Gemma 3
   (local + global layers, soft-capped logits) computed on the accelerator against the jax
   CPU backend in the same process, in float32 (the accelerator may run float32 matmuls as
   TF32) and in the fast setting (bfloat16 parameters and matmuls,
   `jax.nn.dot_product_attention`); and the float32 CPU model against transformers + torch
   on the same random weights (the reference the suite's parity tests use);
2. measures, for random-weight models of the real SmolLM2-135M and Qwen3-0.6B shapes
   (built from their config values, nothing downloaded), the fine-tuning step (full
   fine-tune) and the grounding step (new rows only, backbone frozen) in bfloat16: median
   step time, tokens/s and MFU;
3. measures constrained beam search (`gti_jax.models.decode.beam_search` over a trie of
   random 4-token item IDs): prompts/s;
4. writes one markdown table (``--out``, and stdout).

MFU = model FLOP/s / the chip's peak dense bfloat16 FLOP/s (`PEAK_TFLOPS`). Model FLOPs per
token (the PaLM paper's count, arXiv 2204.02311 appendix B, attention not halved for
causality): the fine-tuning step does forward + backward for activations and weights,
``6 N + 12 L T d_attn``; the grounding step has no weight gradients (the backbone is frozen:
only the gradient reaching the input rows is computed), ``4 N + 8 L T d_attn``; `N` counts the
matmul parameters (attention and MLP projections and the output head; embedding lookups are
not FLOPs), `d_attn` = heads x head_dim, `T` the sequence length.

Memory: the compiled step's own buffers (XLA's `memory_analysis`: arguments + outputs + temp
- aliased), and the device's peak bytes in use after each row where the backend reports it
(`Device.memory_stats()`; the CPU backend does not, and then the process's peak RSS is given).

Usage (from the repository root; needs jax with the accelerator's plugin, flax, optax,
orbax, transformers, torch; no install, no download)::

    bash scripts/device_check.sh [--out docs/device_check.md]    # the accelerator
    bash scripts/device_check.sh --cpu                            # tiny sizes on CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import resource
import statistics
import sys
import time

if "--cpu" in sys.argv:  # before jax is imported: the CPU backend only
    os.environ["JAX_PLATFORMS"] = "cpu"
# Compiled programs cached on disk for this run (unless the caller set a cache): measuring a
# step's memory lowers and compiles it once more, which then costs a cache read.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="device_check-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from gti_jax.models.config import LlamaConfig  # noqa: E402
from gti_jax.models.decode import TrieConstraint, beam_search  # noqa: E402
from gti_jax.models.gemma3 import Gemma3Config, Gemma3ForCausalLM  # noqa: E402
from gti_jax.models.llama import LlamaForCausalLM, configure_compute  # noqa: E402
from gti_jax.plan.shapes import MODEL_SHAPES  # noqa: E402
from gti_jax.train.config import ComputeConfig, GroundConfig, SFTConfig  # noqa: E402
from gti_jax.train.data import Batch  # noqa: E402
from gti_jax.train.ground import ground_optimizer, make_ground_step, split_new_rows  # noqa: E402
from gti_jax.train.steps import cast_params, make_sft_step, model_lm_loss, sft_optimizer  # noqa: E402

# Peak dense (no sparsity) bfloat16 tensor FLOP/s, in TFLOP/s, by `device_kind` substring
# (first match wins, so the more specific names come first). Sources: NVIDIA's data sheets
# (H100 SXM / PCIe and H200: "BF16 Tensor Core 1,979 / 1,513 / 1,979 TFLOPS with sparsity",
# halved for dense; A100: 312 dense; L4: 121 dense; A10: 125 dense) and Google Cloud's TPU
# system architecture pages (v4: 275, v5e: 197, v5p: 459, v6e Trillium: 918 per chip).
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("TPU v6", 918.0),
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v4", 275.0),
)

# The real shapes (config.json values of HuggingFaceTB/SmolLM2-135M and Qwen/Qwen3-0.6B).
# The shapes checked, by their names in gti_jax.plan's table of public config.json files.
SHAPES = {"SmolLM2-135M": "smollm2-135m", "Qwen3-0.6B": "qwen3-0.6b"}
# --cpu: the same families at tiny sizes (the same code paths, seconds instead of minutes).
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2)

# Parity tolerances, relative to the largest |logit| of the reference. TF32 keeps 11
# significant bits (u = 2**-11) and bfloat16 8 (u = 2**-8); a logit is a sum over the
# hidden size of rounded products, computed through two layers, so 8u bounds its error.
TOL_F32_ACCEL = 8 * 2.0**-11
TOL_BF16 = 8 * 2.0**-8
TOL_TORCH = 1e-4  # float32 on the CPU on both sides: summation order only


def peak_tflops(kind: str) -> float | None:
    """The peak dense bf16 TFLOP/s of a `device_kind`, or None when not in the table."""
    for name, peak in PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return peak
    return None


def matmul_params(cfg: LlamaConfig) -> int:
    """Parameters that take part in a matmul per token: projections and the output head."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h, k = cfg.num_attention_heads, cfg.num_key_value_heads
    per_layer = d * hd * (2 * h + 2 * k) + 3 * d * f
    return cfg.num_hidden_layers * per_layer + cfg.vocab_size * d


def flops_per_token(cfg: LlamaConfig, seq: int, *, weight_grads: bool) -> float:
    """Training FLOPs per token (the module docstring's count)."""
    n = matmul_params(cfg)
    attn = cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim
    return (6 * n + 12 * attn) if weight_grads else (4 * n + 8 * attn)


def median_time(fn, repeats: int) -> float:
    """Median seconds of `fn()` (which must block until its result is ready) after 2 warm-ups
    (the first compiles)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_peak_bytes() -> tuple[float, str]:
    """Peak bytes so far: the device's (when it reports it) or the process's RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "device peak"
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process RSS peak"


def compiled_bytes(lowered) -> float:
    m = lowered.compile().memory_analysis()
    if m is None:
        return float("nan")
    return float(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def gib(x: float) -> str:
    """Bytes as GiB, or MiB below one GiB (the --cpu sizes)."""
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


# --------------------------------------------------------------------------------------------
# 1. Parity.
# --------------------------------------------------------------------------------------------


def _parity_models():
    base = dict(TINY, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    qwen = LlamaConfig(**base, head_dim=32, qk_norm=True, model_type="qwen3")
    gemma = Gemma3Config(
        **base,
        head_dim=16,
        sliding_window=8,
        query_pre_attn_scalar=24.0,
        layer_types=("sliding_attention", "full_attention"),
        final_logit_softcapping=30.0,
    )
    return {"tiny Qwen3": qwen, "tiny Gemma 3": gemma}


def _parity_batch(vocab: int) -> Batch:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(4, 32)).astype(np.int32)
    att = np.ones((4, 32), np.int32)
    att[1, 20:] = 0
    att[3, 9:] = 0
    loss = att.astype(np.float32)
    loss[:, :4] = 0
    return Batch(ids, loss, att)


def _torch_logits(cfg: LlamaConfig, tensors: dict, ids: np.ndarray, att: np.ndarray):
    import torch
    import transformers

    hf = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    model = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="eager")
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=False
    )
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(att).long())
    return out.logits.float().numpy()


def _logits_and_loss(model, batch: Batch):
    @nnx.jit
    def run(m, b):
        logits = m(b.input_ids, attention_mask=b.attention_mask)
        s, n = model_lm_loss(m, b)
        return logits, s / n

    logits, loss = run(model, batch)
    return np.asarray(logits, np.float32), float(loss)


def parity_rows(accel: jax.Device, cpu: jax.Device) -> list[dict]:
    """Rows of the parity checks (see the module docstring)."""
    from gti_jax.models.hf import model_to_tensors

    rows = []
    for name, cfg in _parity_models().items():
        cls = Gemma3ForCausalLM if isinstance(cfg, Gemma3Config) else LlamaForCausalLM
        batch = _parity_batch(cfg.vocab_size)
        real = batch.attention_mask.astype(bool)
        with jax.default_device(cpu):
            model = cls(cfg, rngs=nnx.Rngs(0))
            # matrices of a useful size (init std 0.02 leaves every logit near 0); norm scales
            # keep their init
            _, state = nnx.split(model)
            state = jax.tree.map(lambda x: x * 5.0 if x.ndim >= 2 else x, state)
            nnx.update(model, state)
            ref, ref_loss = _logits_and_loss(model, jax.device_put(batch, cpu))
        scale = float(np.abs(ref[real]).max())
        checks = []
        if name == "tiny Qwen3":
            tensors = model_to_tensors(model)
            torch_logits = _torch_logits(cfg, tensors, batch.input_ids, batch.attention_mask)
            checks.append(("CPU f32 vs transformers (torch CPU)", torch_logits, None, TOL_TORCH))
        graphdef, state = nnx.split(model)
        on_accel = jax.device_put(state, accel)
        f32, f32_loss = _logits_and_loss(
            nnx.merge(graphdef, on_accel), jax.device_put(batch, accel)
        )
        checks.append(("accelerator f32 vs CPU f32", f32, f32_loss, TOL_F32_ACCEL))
        fast = nnx.merge(graphdef, cast_params(on_accel, jnp.bfloat16))
        for _, mod in nnx.iter_modules(fast):
            if hasattr(mod, "dtype"):
                mod.dtype = jnp.bfloat16
        configure_compute(fast, attention="dot_product", remat="full")
        bf16, bf16_loss = _logits_and_loss(fast, jax.device_put(batch, accel))
        checks.append(("accelerator bf16 + dot_product vs CPU f32", bf16, bf16_loss, TOL_BF16))
        for what, got, got_loss, tol in checks:
            err = float(np.abs(got[real] - ref[real]).max()) / scale
            result = f"logit error {err:.1e} of the largest logit"
            ok = err <= tol
            if got_loss is not None:
                loss_err = abs(got_loss - ref_loss) / ref_loss
                result += f", dloss/loss {loss_err:.1e}"
                ok = ok and loss_err <= tol
            row = dict(check="parity", model=name, setting=what, value=err, ok=ok)
            rows.append(row | {"result": f"{result} (tol {tol:.1e})"})
    return rows


# --------------------------------------------------------------------------------------------
# 2. Training steps.
# --------------------------------------------------------------------------------------------


def _config(name: str, cpu: bool) -> LlamaConfig:
    values = dataclasses.asdict(LlamaConfig.from_hf_dict(MODEL_SHAPES[SHAPES[name]]))
    # random weights, no tokenizer: no special token ids (they may not fit the --cpu table)
    values.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if cpu:
        values.update(TINY, num_attention_heads=4, num_key_value_heads=2)
        if "head_dim" in values:
            values["head_dim"] = 16
    return LlamaConfig(**values)


def _train_batch(cfg: LlamaConfig, b: int, t: int, new: range, seed: int = 0) -> Batch:
    """Random ids with a new token in the last quarter of each row; loss on the last half."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, new.start, size=(b, t)).astype(np.int32)
    ids[:, 3 * t // 4] = rng.integers(new.start, new.stop, size=b)
    loss = np.zeros((b, t), np.float32)
    loss[:, t // 2 :] = 1.0
    return Batch(jnp.asarray(ids), jnp.asarray(loss), jnp.ones((b, t), jnp.int32))


def step_rows(name: str, *, cpu: bool, peak: float | None, repeats: int) -> list[dict]:
    cfg = _config(name, cpu)
    b, t = (2, 32) if cpu else (8, 512)
    new = range(cfg.vocab_size - (16 if cpu else 1024), cfg.vocab_size)
    compute = ComputeConfig(attention="dot_product", param_dtype="bfloat16")
    setting = f"B x T = {b} x {t}, bf16 params + matmuls, dot_product attention"
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    batch = _train_batch(cfg, b, t, new)
    rows = []

    sft = make_sft_step(
        model,
        sft_optimizer(SFTConfig(steps=1000, lr=1e-5, warmup_steps=0)),
        lora=False,
        compute_dtype=jnp.bfloat16,
        compute=compute,
    )
    holder = {"st": sft.init(model)}
    key = jax.random.key(0)

    def sft_once():
        holder["st"], m = sft(holder["st"], batch, key)
        m["loss"].block_until_ready()

    seconds = median_time(sft_once, repeats)
    st = holder["st"]
    mem = compiled_bytes(sft.lower(st.trainable, st.frozen, batch, key, opt_state=st.opt_state))
    loss = float(sft(st, batch, key)[1]["loss"])
    del holder, st
    rows.append(
        _speed_row(
            "SFT step (full)", name, cfg, setting, seconds, b, t, peak, mem, loss, weight_grads=True
        )
    )

    graphdef, state = nnx.split(model)
    ground = make_ground_step(
        graphdef,
        state,
        new,
        ground_optimizer(GroundConfig(steps=1000, warmup_steps=0)),
        tied=True,
        compute_dtype=jnp.bfloat16,
        compute=compute,
        split_prefix=False,
    )
    params, opt = ground.init(split_new_rows(state, new, tied=True))
    holder = {"p": (params, opt)}

    def ground_once():
        p, o, m = ground(*holder["p"], batch)
        holder["p"] = (p, o)
        m["loss"].block_until_ready()

    seconds = median_time(ground_once, repeats)
    p, o = holder["p"]
    mem = compiled_bytes(ground.lower(p, ground.frozen_state, batch, 0, opt_state=o))
    loss = float(ground.loss(p, batch)[0] / ground.loss(p, batch)[1])
    rows.append(
        _speed_row(
            f"ground step ({len(new)} new rows)",
            name,
            cfg,
            setting,
            seconds,
            b,
            t,
            peak,
            mem,
            loss,
            weight_grads=False,
        )
    )
    rows.append(beam_row(name, model, cfg, new, cpu=cpu, repeats=repeats))
    return rows


def _speed_row(check, name, cfg, setting, seconds, b, t, peak, mem, loss, *, weight_grads):
    tokens = b * t / seconds
    flops = flops_per_token(cfg, t, weight_grads=weight_grads) * tokens
    mfu = flops / (peak * 1e12) if peak else float("nan")
    dev_peak, how = device_peak_bytes()
    return dict(
        check=check,
        model=f"{name} shape" + (" (tiny)" if cfg.num_hidden_layers == 2 else ""),
        setting=setting,
        step_ms=seconds * 1e3,
        tokens_s=tokens,
        mfu=mfu,
        tflops=flops / 1e12,
        memory=f"step {gib(mem)}; {how} {gib(dev_peak)}",
        loss=loss,
        ok=math.isfinite(loss) and math.isfinite(seconds),
    )


# --------------------------------------------------------------------------------------------
# 3. Beam search.
# --------------------------------------------------------------------------------------------


def beam_row(name, model, cfg, new, *, cpu: bool, repeats: int) -> dict:
    rng = np.random.default_rng(1)
    n_items, beams = (50, 5) if cpu else (2000, 20)
    b, prompt = (2, 16) if cpu else (16, 128)
    items = {tuple(int(x) for x in rng.choice(len(new), 4) + new.start) for _ in range(n_items)}
    trie = TrieConstraint.from_sequences(sorted(items))
    prompts = [list(map(int, rng.integers(0, new.start, prompt))) for _ in range(b)]
    fast = configure_compute(nnx.merge(*nnx.split(model)), attention="dot_product")

    def once():
        out = beam_search(fast, prompts, num_beams=beams, max_new_tokens=4, constraint=trie)
        np.asarray(out.scores)

    seconds = median_time(once, repeats)
    dev_peak, how = device_peak_bytes()
    return dict(
        check="beam search",
        model=f"{name} shape" + (" (tiny)" if cpu else ""),
        setting=f"{b} prompts x {prompt} tokens, {beams} beams, trie of {len(items)} 4-token IDs",
        step_ms=seconds * 1e3,
        prompts_s=b / seconds,
        memory=f"{how} {gib(dev_peak)}",
        ok=math.isfinite(seconds),
    )


# --------------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------------

HEADER = ("check", "model", "setting", "time", "throughput", "MFU", "memory", "result")


def _cells(row: dict) -> tuple[str, ...]:
    ms = row.get("step_ms")
    time_s = "" if ms is None else f"{ms:.1f} ms"
    if "tokens_s" in row:
        thr = f"{row['tokens_s']:,.0f} tokens/s ({row['tflops']:.2f} TFLOP/s)"
    elif "prompts_s" in row:
        thr = f"{row['prompts_s']:,.1f} prompts/s"
    else:
        thr = ""
    mfu = row.get("mfu")
    mfu_s = "" if mfu is None else ("n/a" if math.isnan(mfu) else f"{100 * mfu:.1f}%")
    result = row.get("result") or (f"loss {row['loss']:.3f}" if "loss" in row else "")
    result = (
        f"{'ok' if row['ok'] else 'FAIL'}: {result}" if result else ("ok" if row["ok"] else "FAIL")
    )
    return (
        row["check"],
        row["model"],
        row["setting"],
        time_s,
        thr,
        mfu_s,
        row.get("memory", ""),
        result,
    )


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Device: {meta['device']} ({meta['platform']}); jax {meta['jax']}; peak bf16 "
        f"{meta['peak']}; {meta['when']}; total {meta['seconds']:.0f} s.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU backend")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--device-kind", help="the chip for the MFU peak (default: detected)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure")
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated shapes")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    accel = jax.devices()[0]
    cpu = jax.devices("cpu")[0]
    kind = args.device_kind or accel.device_kind
    peak = peak_tflops(kind)
    repeats = args.repeats or (3 if args.cpu else 10)
    log = lambda msg: print(
        f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True
    )  # noqa: E731
    log(f"device {kind} ({accel.platform}); peak {peak} TFLOP/s")
    rows = parity_rows(accel, cpu)
    log("parity done")
    for name in [m for m in args.models.split(",") if m]:
        rows += step_rows(name, cpu=args.cpu, peak=peak, repeats=repeats)
        log(f"{name} done")
    meta = dict(
        device=kind,
        platform=accel.platform,
        jax=jax.__version__,
        peak="n/a (not in PEAK_TFLOPS)" if peak is None else f"{peak:g} TFLOP/s",
        when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + f", {platform.node()}",
        seconds=time.perf_counter() - t0,
    )
    table = markdown(rows, meta)
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
