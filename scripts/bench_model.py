"""Benchmark: SmolLM2-135M forward and greedy decoding, gti_jax (JAX, jit) vs transformers (torch).

Both sides use the same weights: the GGUF checkpoint is loaded with
`gti_jax.models.load_pretrained("smollm2-135m")`, exported with `export_hf_dir` to a temporary
directory and loaded from there with `AutoModelForCausalLM` (float32, eager attention).

* forward: logits for a batch of 8 x 128 random token ids (tokens/s = 1024 / time);
* decode: batch 8 prompts of 32 tokens, 64 new tokens each, greedy with the KV cache
  (gti_jax `generate` with no EOS; transformers `generate(do_sample=False, max_new_tokens=64,
  min_new_tokens=64)`), prefill included (tokens/s = 512 / time).

Each figure is the median of `--repeats` timed runs after one warm-up run (which compiles).

Usage::

    python scripts/bench_model.py [--repeats 5] [--json bench_model.json]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from gti_jax.models import export_hf_dir, load_pretrained
from gti_jax.models.decode import generate


def _median(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", default="bench_model.json")
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    model, tok = load_pretrained("smollm2-135m")
    tmp = tempfile.mkdtemp(prefix="bench_model_")
    export_hf_dir(model, None, tok, os.path.join(tmp, "smollm2"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(tmp, "smollm2"), dtype=torch.float32, attn_implementation="eager"
    ).eval()

    rng = np.random.default_rng(0)
    b, t = args.batch, args.seq
    ids = rng.integers(100, 40_000, size=(b, t)).astype(np.int32)
    graphdef, state = nnx.split(model)
    ids_j, ids_t = jnp.asarray(ids), torch.from_numpy(ids.astype(np.int64))

    def jax_forward():
        _forward(graphdef, state, ids_j).block_until_ready()

    def torch_forward():
        with torch.no_grad():
            hf(ids_t)

    with torch.no_grad():
        diff = float(
            np.abs(hf(ids_t).logits.numpy() - np.asarray(_forward(graphdef, state, ids_j))).max()
        )
    fwd_j, fwd_j_all = _median(jax_forward, args.repeats)
    fwd_t, fwd_t_all = _median(torch_forward, args.repeats)

    p, n = args.prompt_len, args.new_tokens
    prompts = rng.integers(100, 40_000, size=(b, p)).astype(np.int64)
    prompts_list = prompts.tolist()
    prompts_t = torch.from_numpy(prompts)
    out = {}

    def jax_decode():
        out["jax"] = generate(model, prompts_list, max_new_tokens=n, eos_ids=()).tokens

    def torch_decode():
        with torch.no_grad():
            out["torch"] = hf.generate(
                prompts_t,
                attention_mask=torch.ones_like(prompts_t),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=tok.eos_token_id,
            )[:, p:].numpy()

    dec_j, dec_j_all = _median(jax_decode, args.repeats)
    dec_t, dec_t_all = _median(torch_decode, args.repeats)
    agree = float(np.mean(out["jax"] == out["torch"]))

    rows = [
        ("forward", f"{b}x{t}", b * t / fwd_j, b * t / fwd_t),
        ("greedy decode", f"{b}x({p}+{n})", b * n / dec_j, b * n / dec_t),
    ]
    print(f"SmolLM2-135M float32, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}, torch {torch.__version__}")  # fmt: skip
    print(f"{'task':<15}{'shape':<14}{'gti_jax tok/s':>15}{'torch tok/s':>14}{'ratio':>8}")
    for name, shape, tj, tt in rows:
        print(f"{name:<15}{shape:<14}{tj:>15.1f}{tt:>14.1f}{tj / tt:>8.2f}")
    print(f"best-run ratios: forward {min(fwd_t_all) / min(fwd_j_all):.2f}, "
          f"decode {min(dec_t_all) / min(dec_j_all):.2f}")  # fmt: skip
    print(f"max |logit diff| forward: {diff:.2e}; greedy tokens identical: {agree:.1%}")
    result = {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "repeats": args.repeats,
        "forward": {
            "batch": b,
            "seq": t,
            "jax_s": fwd_j_all,
            "torch_s": fwd_t_all,
            "jax_tok_s": b * t / fwd_j,
            "torch_tok_s": b * t / fwd_t,
            "ratio": fwd_t / fwd_j,
            "ratio_best": min(fwd_t_all) / min(fwd_j_all),
            "max_abs_logit_diff": diff,
        },
        "decode": {
            "batch": b,
            "prompt_len": p,
            "new_tokens": n,
            "jax_s": dec_j_all,
            "torch_s": dec_t_all,
            "jax_tok_s": b * n / dec_j,
            "torch_tok_s": b * n / dec_t,
            "ratio": dec_t / dec_j,
            "ratio_best": min(dec_t_all) / min(dec_j_all),
            "greedy_token_agreement": agree,
        },
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
