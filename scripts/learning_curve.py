"""Tables and a plot of learning curves: ``curve.jsonl`` of runs with ``eval.curve_every``.

    python scripts/learning_curve.py --run sequence=runs/curve_sequence \\
        --run prompt=runs/curve_prompt --out docs/results/learning_curve.png

Prints a markdown table per run (step, targets seen, training wall and CPU time, Recall@10,
NDCG@10, and the standard error of Recall@10 over the evaluated users) with the popularity
baseline of the same users, and the first point where Recall@10 passes the target (default
0.07); writes Recall@10 and NDCG@10 against targets seen and CPU time as one PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path


def read_curve(run_dir: Path) -> list[dict]:
    path = run_dir / "curve.jsonl"
    if not path.is_file():
        raise SystemExit(f"learning_curve: {path} not found; run with eval.curve_every > 0")
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def stderr(p: float, n: int) -> float:
    """Standard error of a hit rate p over n users."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def table(name: str, rows: list[dict], k: int, target: float) -> list[str]:
    pop = rows[0].get("popularity_baseline") or {}
    out = [
        f"**{name}** ({rows[0]['num_eval']} test users; popularity on the same users: "
        f"Recall@{k} {pop.get(f'recall@{k}', float('nan')):.4f}, NDCG@{k} "
        f"{pop.get(f'ndcg@{k}', float('nan')):.4f})",
        "",
        f"| step | targets seen | train wall s | train CPU s | Recall@{k} (± s.e.) | NDCG@{k} |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rec = r[f"recall@{k}"]
        out.append(
            f"| {r['step']} | {r['targets_seen']:,} | {r['train_seconds']:.0f} | "
            f"{r.get('cpu_seconds', float('nan')):.0f} | {rec:.4f} ± "
            f"{stderr(rec, r['num_eval']):.4f} | {r[f'ndcg@{k}']:.4f} |"
        )
    hit = next((r for r in rows if r[f"recall@{k}"] >= target), None)
    out += [
        "",
        (
            f"First point at Recall@{k} >= {target}: step {hit['step']} "
            f"({hit['train_seconds']:.0f} s wall, {hit.get('cpu_seconds', float('nan')):.0f} s CPU)."
            if hit
            else f"No point reaches Recall@{k} >= {target} (best {max(r[f'recall@{k}'] for r in rows):.4f})."
        ),
    ]
    return out


def plot(curves: dict[str, list[dict]], k: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, rows in curves.items():
        x_t = [r["targets_seen"] for r in rows]
        x_c = [r.get("cpu_seconds", r["train_seconds"]) / 60 for r in rows]
        rec = [r[f"recall@{k}"] for r in rows]
        nd = [r[f"ndcg@{k}"] for r in rows]
        (line,) = axes[0].plot(x_t, rec, "o-", label=name)
        axes[1].plot(x_c, rec, "o-", color=line.get_color(), label=name)
        axes[2].plot(x_c, nd, "o-", color=line.get_color(), label=name)
        pop = rows[0].get("popularity_baseline") or {}
        for ax, key in ((axes[0], "recall"), (axes[1], "recall"), (axes[2], "ndcg")):
            if f"{key}@{k}" in pop:
                ax.axhline(pop[f"{key}@{k}"], ls="--", color=line.get_color(), alpha=0.5)
    axes[0].set(xlabel="targets seen", ylabel=f"Recall@{k}")
    axes[1].set(xlabel="training CPU minutes", ylabel=f"Recall@{k}")
    axes[2].set(xlabel="training CPU minutes", ylabel=f"NDCG@{k}")
    for ax in axes:
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Learning curves on all test users (dashed: popularity on the same users)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR (repeatable)")
    p.add_argument("--out", default=None, help="PNG path")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--target", type=float, default=0.07)
    args = p.parse_args(argv)
    curves = {}
    for spec in args.run:
        name, _, path = spec.partition("=")
        if not path:
            print(f"learning_curve: --run {spec!r}: write NAME=RUN_DIR", file=sys.stderr)
            return 2
        curves[name] = read_curve(Path(path))
    for name, rows in curves.items():
        print("\n".join(table(name, rows, args.k, args.target)) + "\n")
    if args.out:
        plot(curves, args.k, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
