"""Benchmark: constrained beam search over item IDs, gti_jax vs transformers, on SmolLM2-135M.

Set-up (identical for both sides): SmolLM2-135M-Instruct from `load_pretrained("smollm2-135m")`;
48 new tokens `<a_0>..<a_15>`, `<b_0>..<b_15>`, `<c_0>..<c_15>` added with
`gti_jax.vocab.extend_tokenizer` and the table grown with `resize_vocab` (`mean_noise`,
padded to a multiple of 64 rows, so the table has spare rows past the tokenizer); 200 random
distinct item IDs `<a_i><b_j><c_k>` (3 new tokens each); prompts "The user watched <ID>,
<ID>, ... What is next?" with 5 watched items. The extended model is exported with
`export_hf_dir` and loaded in transformers (float32, eager attention).

* gti_jax: `beam_search(num_beams=20, max_new_tokens=3, constraint=TrieConstraint)` (one jit);
* transformers: `generate(num_beams=20, num_return_sequences=20, max_new_tokens=3,
  prefix_allowed_tokens_fn=<the same trie>, length_penalty=0.0, do_sample=False)`.

Reported: sequences/s (prompts x 20 beams per second, median of `--repeats` runs after one
warm-up each; the two sides alternate within a repeat), the ratio (of the medians, and its
range over the repeats), the load average before and after, that every returned sequence
is a valid ID, and the top-1 agreement and mean overlap of the two 20-best lists.

Usage::

    python scripts/bench_decode.py [--prompts 4] [--repeats 5] [--json bench_decode.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from gti_jax.models import export_hf_dir, load_pretrained
from gti_jax.models.decode import TrieConstraint, beam_search
from gti_jax.vocab.resize import EmbeddingSpec, resize_vocab
from gti_jax.vocab.tokens import extend_tokenizer

NUM_BEAMS = 20


def _timed(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per run of each function, after one warm-up each (which compiles). The sides
    alternate within each repeat, so on a shared machine each repeat's ratio compares runs
    made under about the same load."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--history", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="bench_decode.json")
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    model, tok = load_pretrained("smollm2-135m")
    num_old = len(tok)
    levels = "abc"
    new_tokens = [f"<{lv}_{i}>" for lv in levels for i in range(16)]
    extend_tokenizer(tok, new_tokens)
    state = resize_vocab(
        nnx.state(model),
        EmbeddingSpec.nnx_llama(tied=True),
        len(tok),
        "mean_noise",
        jax.random.key(0),
        num_tokens=num_old,
        pad_to_multiple_of=64,
    )
    nnx.update(model, state)
    num_tokens = len(tok)

    rng = np.random.default_rng(0)
    codes = set()
    while len(codes) < args.items:
        codes.add(tuple(int(c) for c in rng.integers(0, 16, size=3)))
    items = sorted(codes)
    item_text = [
        "".join(f"<{lv}_{c}>" for lv, c in zip(levels, code, strict=True)) for code in items
    ]
    item_ids = [tok.encode(t, add_special_tokens=False) for t in item_text]
    assert all(len(ids) == 3 for ids in item_ids), "each ID must be 3 new tokens"
    trie = TrieConstraint.from_sequences(item_ids)
    valid = {tuple(ids) for ids in item_ids}

    texts = []
    for _ in range(args.prompts):
        seen = rng.choice(len(items), size=args.history, replace=False)
        texts.append(
            "The user watched " + ", ".join(item_text[i] for i in seen) + ". What is next? "
        )
    prompts = [tok.encode(t) for t in texts]

    tmp = tempfile.mkdtemp(prefix="bench_decode_")
    export_hf_dir(model, None, tok, os.path.join(tmp, "smollm2_ids"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(tmp, "smollm2_ids"), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids_t = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask_t = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids_t[i, width - len(p) :] = torch.tensor(p)
        mask_t[i, width - len(p) :] = 1

    def allowed(batch_id, input_ids):
        return trie.allowed(input_ids[width:].tolist())

    out = {}

    def run_jax():
        out["jax"] = beam_search(
            model,
            prompts,
            num_beams=NUM_BEAMS,
            max_new_tokens=3,
            num_tokens=num_tokens,
            constraint=trie,
            pad_id=pad,
        )

    def run_torch():
        with torch.no_grad():
            res = hf.generate(
                ids_t,
                attention_mask=mask_t,
                num_beams=NUM_BEAMS,
                num_return_sequences=NUM_BEAMS,
                max_new_tokens=3,
                do_sample=False,
                length_penalty=0.0,
                prefix_allowed_tokens_fn=allowed,
                pad_token_id=pad,
                output_scores=False,
            )
        out["torch"] = res[:, width:].reshape(len(prompts), NUM_BEAMS, -1).tolist()

    load_before = os.getloadavg()
    times = _timed({"jax": run_jax, "torch": run_torch}, args.repeats)
    load_after = os.getloadavg()
    t_jax_all, t_torch_all = times["jax"], times["torch"]
    t_jax, t_torch = statistics.median(t_jax_all), statistics.median(t_torch_all)
    ratios = [b / a for a, b in zip(t_jax_all, t_torch_all, strict=True)]

    ours = out["jax"].sequences
    theirs = out["torch"]
    valid_jax = all(tuple(s) in valid for seqs in ours for s in seqs)
    valid_torch = all(tuple(s) in valid for seqs in theirs for s in seqs)
    top1 = float(np.mean([a[0] == b[0] for a, b in zip(ours, theirs, strict=True)]))
    overlap = float(
        np.mean(
            [
                len({tuple(s) for s in a} & {tuple(s) for s in b}) / NUM_BEAMS
                for a, b in zip(ours, theirs, strict=True)
            ]
        )
    )
    n_seq = len(prompts) * NUM_BEAMS
    print(f"SmolLM2-135M + 48 ID tokens, {args.items} items, {len(prompts)} prompts "
          f"(~{width} tokens), {NUM_BEAMS} beams, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'':<14}{'median s':>10}{'sequences/s':>14}")
    print(f"{'gti_jax':<14}{t_jax:>10.3f}{n_seq / t_jax:>14.1f}")
    print(f"{'transformers':<14}{t_torch:>10.3f}{n_seq / t_torch:>14.1f}")
    print(f"ratio gti_jax/transformers: {t_torch / t_jax:.1f}x (medians); "
          f"{min(t_torch_all) / min(t_jax_all):.1f}x (best runs); per repeat "
          f"{min(ratios):.1f}x..{max(ratios):.1f}x")  # fmt: skip
    fmt = lambda load: " ".join(f"{x:.2f}" for x in load)
    print(f"load average (1, 5, 15 min): before {fmt(load_before)}, after {fmt(load_after)}")
    print(f"all valid: gti_jax {valid_jax}, transformers {valid_torch}; top-1 agreement "
          f"{top1:.0%}; mean 20-best overlap {overlap:.0%}")  # fmt: skip
    result = {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompts": len(prompts),
        "prompt_tokens": width,
        "items": args.items,
        "num_beams": NUM_BEAMS,
        "repeats": args.repeats,
        "jax_s": t_jax_all,
        "torch_s": t_torch_all,
        "jax_seq_s": n_seq / t_jax,
        "torch_seq_s": n_seq / t_torch,
        "ratio": t_torch / t_jax,
        "ratio_best": min(t_torch_all) / min(t_jax_all),
        "ratios": ratios,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "all_valid_jax": valid_jax,
        "all_valid_torch": valid_torch,
        "top1_agreement": top1,
        "mean_overlap": overlap,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
