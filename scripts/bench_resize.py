"""Benchmark: growing an embedding table with gti_jax vs Hugging Face vs a numpy copy.

For each shape, in one process and one run, times (median of --repeats runs, after one
warm-up that also compiles):

* ``numpy copy``: allocate the output table and copy the old rows plus one mean row into
  it: the memory-bandwidth floor of any resize;
* ``gti_jax mean`` / ``gti_jax mean_cov``: :func:`gti_jax.vocab.resize_vocab` (jit);
* ``HF mean_resizing=False`` / ``HF mean_resizing=True``: transformers
  ``resize_token_embeddings`` on a 1-layer torch model with the same (tied) embedding; the
  second is Hugging Face's default, the covariance initializer.

Usage::

    python scripts/bench_resize.py [--repeats 5] [--shapes qwen3,smollm2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gti_jax.vocab.resize import EmbeddingSpec, resize_vocab

SHAPES = {
    "qwen3": dict(
        rows=151_936, dim=1_024, new=24_576, label="Qwen3-0.6B-shaped 151,936 x 1,024, +24,576"
    ),
    "smollm2": dict(rows=49_152, dim=576, new=1_024, label="SmolLM2-shaped 49,152 x 576, +1,024"),
}


def _median_time(fn, repeats, setup=None):
    times = []
    for _ in range(repeats + 1):  # the first run warms up (and compiles) and is discarded
        arg = setup() if setup else None
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), times[1:]


def bench_numpy(table, new, repeats):
    def run(_):
        rows, dim = table.shape
        out = np.empty((rows + new, dim), table.dtype)
        out[:rows] = table
        out[rows:] = table[0]
        return out

    return _median_time(run, repeats)


def bench_gti(table, new, init, repeats):
    rows = table.shape[0]
    params = {"embed": jnp.asarray(table)}
    spec = EmbeddingSpec(embed=("embed",))
    key = jax.random.key(0)

    def run(_):
        out = resize_vocab(params, spec, rows + new, init, key)
        out["embed"].block_until_ready()

    return _median_time(run, repeats)


def bench_hf(table, new, mean_resizing, repeats):
    import torch
    import transformers

    rows, dim = table.shape
    cfg = transformers.Qwen3Config(
        vocab_size=rows,
        hidden_size=dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=dim // 8,
        tie_word_embeddings=True,
    )
    weights = torch.from_numpy(table)

    def setup():  # a fresh model each run (resize changes it in place); not timed
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg))
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(weights)
        model.tie_weights()
        return model

    def run(model):
        model.resize_token_embeddings(rows + new, mean_resizing=mean_resizing)

    return _median_time(run, repeats, setup)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shapes", default="qwen3,smollm2")
    p.add_argument(
        "--skip-hf-default", action="store_true", help="skip HF mean_resizing=True (slow)"
    )
    p.add_argument("--json", default=None)
    p.add_argument(
        "--no-hugepages", action="store_true", help="keep glibc's default malloc (4 KiB pages)"
    )
    args = p.parse_args()
    if not args.no_hugepages:
        from gti_jax._env import reexec_with_hugepage_malloc

        reexec_with_hugepage_malloc()  # as the gti_jax CLIs do; applies to every contender
    import torch

    results = {
        "glibc_tunables": __import__("os").environ.get("GLIBC_TUNABLES", ""),
        "machine": f"{platform.processor() or platform.machine()}, {jax.local_device_count()} jax device(s), torch threads {torch.get_num_threads()}",
        "jax": jax.__version__,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "shapes": {},
    }
    for name in args.shapes.split(","):
        s = SHAPES[name]
        table = (
            np.random.default_rng(0).standard_normal((s["rows"], s["dim"])).astype(np.float32)
            * 0.02
        )
        r = {}
        r["numpy copy"] = bench_numpy(table, s["new"], args.repeats)
        r["gti_jax mean"] = bench_gti(table, s["new"], "mean", args.repeats)
        r["gti_jax mean_cov"] = bench_gti(table, s["new"], "mean_cov", args.repeats)
        r["HF mean_resizing=False"] = bench_hf(table, s["new"], False, args.repeats)
        if not args.skip_hf_default:
            r["HF mean_resizing=True (default)"] = bench_hf(table, s["new"], True, args.repeats)
        results["shapes"][name] = {
            "label": s["label"],
            "seconds": {k: v[0] for k, v in r.items()},
            "runs": {k: v[1] for k, v in r.items()},
        }
        print(f"\n{s['label']} (f32), median of {args.repeats}:")
        floor = r["numpy copy"][0]
        hf_default = r.get("HF mean_resizing=True (default)", (None,))[0]
        for k, (med, _) in r.items():
            extra = f"  {med / floor:6.2f}x numpy copy"
            if hf_default:
                extra += f"  {hf_default / med:8.1f}x faster than HF default"
            print(f"  {k:34s} {med:9.4f} s{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
