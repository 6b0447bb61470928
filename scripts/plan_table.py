"""The docs/benchmarks.md plan table from ``python -m gti_jax.plan ... plan.output=FILE`` files.

Each file is one plan (a model on a mesh, both stages); the table gives every stage's
per-device peak and its estimated step time on each named accelerator, re-estimated from
the stored figures (:func:`gti_jax.plan.build.estimate`), so one compile serves every chip.

    python scripts/plan_table.py plans/*.json --accelerators tpu-v5e tpu-v5p
"""

from __future__ import annotations

import argparse
import json

from gti_jax.plan.build import StagePlan, estimate
from gti_jax.plan.shapes import ACCELERATORS

_GiB = 2**30


def _mesh(m: dict) -> str:
    return " x ".join(f"{k} {v}" for k, v in m.items() if v > 1) or "1 device"


def _time(s: float) -> str:
    return f"{s * 1e3:,.0f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} us"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plans", nargs="+")
    ap.add_argument("--accelerators", nargs="+", default=["tpu-v5e", "tpu-v5p"])
    args = ap.parse_args(argv)
    accs = [ACCELERATORS[a] for a in args.accelerators]
    head = ["model", "stage", "devices", "mesh", "batch", "peak / device"]
    for a in accs:
        head += [f"fits {a.hbm_bytes / _GiB:.0f} GiB", f"step on {a.name} (compute / HBM / comm)"]
    head.append("compile (s)")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
    for path in args.plans:
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
        for st in plan["stages"]:
            st = {k: v for k, v in st.items() if k != "estimate"}
            s = StagePlan(**{**st, "batch": tuple(st["batch"])})
            row = [plan["model"], s.stage, str(s.devices), _mesh(plan["mesh"]),
                   f"{s.batch[0]} x {s.batch[1]}", f"{s.peak_bytes / _GiB:.2f} GiB"]  # fmt: skip
            for a in accs:
                t = estimate(s, a)
                parts = " / ".join(_time(t[k]) for k in ("compute_s", "memory_s", "comm_s"))
                row += ["yes" if s.peak_bytes <= a.hbm_bytes else "**no**",
                        f"{_time(t['step_s'])} ({parts})"]  # fmt: skip
            row.append(f"{s.compile_seconds:.0f}")
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
