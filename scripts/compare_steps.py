"""Do two checkouts compile the same training steps? A load-independent check for refactors.

Timing a refactor against its parent on a shared 2-core machine measures the machine as much
as the code (issue 13: the same bench gave 1.76x one day and 3.12x another). What decides a
jitted step's speed is the program XLA compiles, so this script compares the programs: it runs
the grounding step (with and without the grad-free prefix) and the full fine-tuning step, as
`scripts/bench_train.py` builds them, on a tiny random Llama in each checkout (a subprocess
with that checkout on PYTHONPATH and XLA dumping the optimized HLO), then prints, per step,
the instruction counts by (opcode, shape) that differ and the buffer bytes XLA assigned.
Same counts and bytes: the same work; a difference names exactly what changed.

Usage:
    python scripts/compare_steps.py OLD_CHECKOUT NEW_CHECKOUT
    # e.g. git worktree add /tmp/old 12dee29 && python scripts/compare_steps.py /tmp/old .
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import subprocess
import sys
import tempfile

# Runs inside each checkout: builds the steps the way scripts/bench_train.py does.
_DUMP = r"""
import sys, tempfile
import numpy as np
from flax import nnx
from tests.helpers.hf_models import make_tiny_hf_model
from gti_jax.models import load_hf_dir
from gti_jax.train.config import GroundConfig, SFTConfig
from gti_jax.train.data import Batch, target_positions
from gti_jax.train.steps import make_sft_step, sft_optimizer
from gti_jax.vocab.resize import EmbeddingSpec, resize_vocab
from gti_jax.vocab.tokens import extend_tokenizer
try:
    from gti_jax.train.ground import ground_optimizer, make_ground_step, split_new_rows
except ModuleNotFoundError:  # checkouts before the redesign moved it
    from gti_jax.ground import ground_optimizer, make_ground_step, split_new_rows

model, tok = load_hf_dir(make_tiny_hf_model(tempfile.mkdtemp(), "llama"))
ids = extend_tokenizer(tok, [f"<bench_{i}>" for i in range(16)])
new = range(ids[0], ids[-1] + 1)
graphdef, state = nnx.split(model)
spec = EmbeddingSpec.nnx_llama(tied=True)
state = resize_vocab(state, spec, len(tok), "mean", pad_to_multiple_of=64)
model = nnx.merge(graphdef, state)
b, t, comp = 4, 64, 8
x = np.random.default_rng(0).integers(0, new.start, size=(b, t)).astype(np.int32)
x[:, 40], x[:, -2] = new.start, new.start + 1
mask = np.zeros((b, t), np.float32)
mask[:, t - comp:] = 1
batch = Batch(x, mask, np.ones((b, t), np.int32), target_positions(list(mask), t, comp))
for fast in (True, False):
    bt = batch if fast else batch._replace(targets=None)
    tx = ground_optimizer(GroundConfig(steps=100, lr=1e-3))
    step = make_ground_step(graphdef, state, new, tx, tied=True, split_prefix=fast)
    p, o = step.init(split_new_rows(state, new, tied=True))
    p, o, m = step(p, o, bt)
    print("STEP ground" + ("" if fast else " (plain)"), float(m["loss"]), flush=True)
    if fast:
        sft = make_sft_step(model, sft_optimizer(SFTConfig(steps=100, lr=1e-5)), lora=False)
        s, m = sft(sft.init(model), bt)
        print("STEP sft", float(m["loss"]), flush=True)
"""

_INSTR = re.compile(r"= (\S+\[[^\]]*\](?:\{[^}]*\})?|\([^)]*\)) (\w[\w-]*)\(")


def _dump(checkout: str, out: str) -> list[str]:
    env = dict(
        os.environ,
        PYTHONPATH=os.path.abspath(checkout),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_dump_to={out} --xla_dump_hlo_as_text",
    )
    r = subprocess.run(
        [sys.executable, "-c", _DUMP], cwd=checkout, env=env, capture_output=True, text=True
    )
    if r.returncode:
        sys.exit(f"{checkout}: the steps failed to run:\n{r.stderr[-3000:]}")
    steps = [line[5:] for line in r.stdout.splitlines() if line.startswith("STEP ")]
    return steps


def _step_modules(out: str) -> list[str]:
    """The optimized modules of the steps, in compile order (the big ones: a step has dots)."""
    files = sorted(glob.glob(os.path.join(out, "module_*cpu_after_optimizations.txt")))
    return [f for f in files if " dot(" in open(f).read() and "jit_stage" not in f]


def _profile(path: str) -> tuple[collections.Counter, str]:
    ops = collections.Counter()
    for line in open(path):
        m = _INSTR.search(line)
        if m and not line.lstrip().startswith("ROOT %tuple"):
            ops[(m.group(2), re.sub(r"\{[^}]*\}", "", m.group(1)))] += 1
    report = path.replace(".txt", "-memory-usage-report.txt")
    total = re.search(r"Total bytes: (\d+)", open(report).read())
    return ops, total.group(1) if total else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dumps = {}
        for side in ("old", "new"):
            out = os.path.join(tmp, side)
            names = _dump(getattr(args, side), out)
            dumps[side] = (names, _step_modules(out))
        (names, old_mods), (_, new_mods) = dumps["old"], dumps["new"]
        if len(old_mods) != len(new_mods):
            sys.exit(f"different numbers of step programs: {len(old_mods)} vs {len(new_mods)}")
        same = True
        for i, (a, b) in enumerate(zip(old_mods, new_mods, strict=True)):
            (oa, ba), (ob, bb) = _profile(a), _profile(b)
            label = names[i].rsplit(" ", 1)[0] if i < len(names) else f"program {i}"
            diff = {"old only": dict(oa - ob), "new only": dict(ob - oa)}
            ok = not diff["old only"] and not diff["new only"] and ba == bb
            same &= ok
            print(
                f"{label}: {sum(oa.values())} vs {sum(ob.values())} instructions, "
                f"{ba} vs {bb} buffer bytes" + ("" if ok else f"; {diff}")
            )
        print("the same programs" if same else "the programs differ (see above)")


if __name__ == "__main__":
    main()
