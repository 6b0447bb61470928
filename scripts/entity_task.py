"""Beyond recommendation: new tokens for well-known entities, grounded only by their names.

Each of 40 capital cities gets a new token (``<city_0>`` ..), described only by the city's
name. The question "Which country is <city_k> the capital of?" is never trained; the model
answers it by constrained beam search over the 40 country names. What the base model knows
from the names themselves is the same question asked with the name ("Which country is Paris
the capital of?"), evaluated the same way. Each arm initializes the new rows one way and
(for +gti) grounds them on name <-> token prompts in both directions, backbone frozen; no
arm fine-tunes on the question. The report gives Recall@1 / @5 per arm and the share of the
name-level knowledge each arm recovers (arm Recall@1 / names Recall@1).

    python scripts/entity_task.py --out runs/entity --report docs/results/entity.md

Every arm is a plain ``python -m gti_jax.train`` run (in-process, one after another) on
files this script writes, so ``--out`` holds each run directory to inspect; finished arms
are skipped on a re-run. Extra ``key=value`` arguments go to every arm (e.g. the model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gti_jax.train.config import load_config  # noqa: E402
from gti_jax.train.run import run  # noqa: E402

CAPITALS = [
    ("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy"),
    ("London", "United Kingdom"), ("Tokyo", "Japan"), ("Beijing", "China"),
    ("Moscow", "Russia"), ("Ottawa", "Canada"), ("Canberra", "Australia"), ("Cairo", "Egypt"),
    ("Athens", "Greece"), ("Lisbon", "Portugal"), ("Dublin", "Ireland"), ("Vienna", "Austria"),
    ("Stockholm", "Sweden"), ("Oslo", "Norway"), ("Helsinki", "Finland"),
    ("Copenhagen", "Denmark"), ("Warsaw", "Poland"), ("Prague", "Czech Republic"),
    ("Budapest", "Hungary"), ("Brussels", "Belgium"), ("Amsterdam", "Netherlands"),
    ("Bern", "Switzerland"), ("Ankara", "Turkey"), ("Tehran", "Iran"), ("Baghdad", "Iraq"),
    ("New Delhi", "India"), ("Bangkok", "Thailand"), ("Hanoi", "Vietnam"),
    ("Seoul", "South Korea"), ("Jakarta", "Indonesia"), ("Manila", "Philippines"),
    ("Nairobi", "Kenya"), ("Buenos Aires", "Argentina"), ("Lima", "Peru"),
    ("Santiago", "Chile"), ("Mexico City", "Mexico"), ("Washington", "United States"),
]  # fmt: skip
QUESTION = "Which country is {x} the capital of?"

# arm -> (eval file, overrides); grounding settings of the +gti arms come from --ground-*
ARMS = {
    "names": ("eval_names.jsonl", ["init=mean", "ground.steps=0"]),
    "mean": ("eval_tokens.jsonl", ["init=mean", "ground.steps=0"]),
    "description": ("eval_tokens.jsonl", ["init=description", "ground.steps=0"]),
    "mean+gti": ("eval_tokens.jsonl", ["init=mean"]),
    "description+gti": ("eval_tokens.jsonl", ["init=description"]),
}


def token(i: int) -> str:
    return f"<city_{i}>"


def write_task(root: Path) -> None:
    """The tokens (name as description), both eval files and the candidate countries."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"token": token(i), "description": city} for i, (city, _) in enumerate(CAPITALS)]
    _jsonl(root / "tokens.jsonl", rows)
    _jsonl(
        root / "eval_tokens.jsonl",
        (
            {"prompt": QUESTION.format(x=token(i)), "completion": c}
            for i, (_, c) in enumerate(CAPITALS)
        ),
    )
    _jsonl(
        root / "eval_names.jsonl",
        ({"prompt": QUESTION.format(x=city), "completion": c} for city, c in CAPITALS),
    )
    (root / "countries.txt").write_text("".join(c + "\n" for _, c in CAPITALS))


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def arm_overrides(arm: str, root: Path, args: argparse.Namespace) -> list[str]:
    eval_file, extra = ARMS[arm]
    base = [
        f"model={args.model}",
        f"run_dir={root / 'runs' / arm.replace('+', '-')}",
        f"seed={args.seed}",
        f"data.tokens={root / 'tokens.jsonl'}",
        f"data.eval={root / eval_file}",
        f"data.candidates={root / 'countries.txt'}",
        "data.max_len=96",
        f"ground.steps={args.ground_steps}",
        f"ground.lr={args.ground_lr}",
        "ground.batch_size=8",
        "ground.warmup_steps=5",
        "sft.steps=0",
        "eval.beams=10",
        "eval.k=[1,5,10]",
        "eval.max_examples=null",
        "eval.max_new_tokens=8",
        "checkpoint.every=0",
        "export.hf=false",
        "export.rows=false",
    ]
    return [*base, *extra, *args.overrides]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/entity", help="where the task files and runs go")
    p.add_argument("--report", default=None, help="write the markdown table here")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ground-steps", type=int, default=100)
    p.add_argument("--ground-lr", type=float, default=1e-2)
    p.add_argument("overrides", nargs="*", help="key=value for every arm")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(
            f"entity_task: unknown arm(s) {', '.join(unknown)}; use {', '.join(ARMS)}",
            file=sys.stderr,
        )
        return 2
    root = Path(args.out)
    write_task(root)
    results: dict[str, dict] = {}
    for arm in arms:
        cfg = load_config(None, arm_overrides(arm, root, args))
        done = Path(cfg.run_dir) / "results.json"
        if not done.is_file():
            t0 = time.perf_counter()
            print(f"entity_task: {arm} ...", file=sys.stderr, flush=True)
            run(cfg)
            print(f"entity_task: {arm} done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        results[arm] = json.loads(done.read_text())
    summary = {
        "settings": {
            "model": args.model,
            "seed": args.seed,
            "ground_steps": args.ground_steps,
            "ground_lr": args.ground_lr,
            "overrides": args.overrides,
            "entities": len(CAPITALS),
        },
        "arms": {
            a: {k: r.get(k) for k in ("recall@1", "recall@5", "recall@10", "exact_match")}
            for a, r in results.items()
        },
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = _table(summary)
    print(table)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(table + "\n")
    return 0


def _table(summary: dict) -> str:
    arms = summary["arms"]
    names = (arms.get("names") or {}).get("recall@1")
    lines = [
        "| arm | Recall@1 | Recall@5 | greedy exact match | share of the names' Recall@1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm, r in arms.items():
        share = f"{r['recall@1'] / names:.2f}" if names else "n/a"
        lines.append(
            f"| {arm} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['exact_match']:.3f} | {share} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
