"""The GTI experiment: does grounding the new tokens beat the usual initializations?

Runs every arm below for several seeds with the same fine-tuning (SFT) budget, each arm x
seed as one :func:`gti_jax.train.run.run` in its own run directory, then writes a report
(``docs/results.md`` by default) with Recall@K / NDCG@K (mean +- std over seeds), the
popularity baseline, the valid-ID rate, the new-token diagnostics, plots, provenance and a
conclusion computed from the numbers.

Arms (every knob not named here comes from the base config, identical for all arms):

=================  ==============================================================
``mean``           mean init, SFT
``mean_noise``     mean + small Gaussian noise init, SFT
``description``    description-average init, SFT
``mean+gti``       mean init, grounding (``ground.steps`` of the base config), SFT
``description+gti`` description init, grounding, SFT
``mean+aux``       mean init, SFT with ``--aux-ratio`` of each batch drawn from the
                   paired text <-> ID prompts (LC-Rec-style multi-task), no grounding
``mean+sft_extra`` mean init, ``sft.steps + ground.steps`` SFT steps: the control that
                   gets the grounding steps as extra SFT steps (compute-matched in steps)
=================  ==============================================================

Seeds and data. All runs share one prepared data directory, ``<out>/data`` (each run
directory links ``data`` to it, and the trainer reuses a prepared directory whose recorded
settings match). ``rec.seed`` is fixed for every run (the base config's ``rec.seed``, or its
top-level ``seed`` when unset), so the split, the subsets and the semantic IDs are the same
for every arm and seed. The per-run ``seed`` changes what is random in training: the noise
of ``mean_noise``, the batch order, the LoRA initialization and the dropout keys. With
``data.tokens`` set in the base config the runs share those files instead.

Layout::

    <out>/data/                       the prepared MovieLens files (once)
    <out>/<arm>/seed<k>/              one trainer run directory (results.json, diagnostics.json, *.png)
    <out>/experiment.json             commands, hardware, the wall time of every run

Resuming: a run whose ``results.json`` exists is skipped; an interrupted run is resumed by
running the same command again (the trainer restores its last checkpoint). Checkpoints of a
finished run are deleted to save disk unless ``--keep-checkpoints``.

Usage::

    python scripts/experiment.py --config configs/experiment_cpu.yaml --out runs/experiment
    python scripts/experiment.py --arms mean,mean+gti --seeds 0,1 sft.steps=50
    python scripts/experiment.py --out runs/experiment --report-only

Exit codes: 0 every run done; 1 a run failed (the others still ran; see the report);
2 bad input; 75 stopped by SIGTERM (re-run the same command to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from gti_jax.pipeline import ConfigError, load_config  # noqa: E402
from gti_jax.pipeline import RunConfig as TrainConfig  # noqa: E402
from gti_jax.rec.paired import (  # noqa: E402
    hits_at_k,
    mcnemar_exact,
    ndcg_at_k_per_user,
    paired_bootstrap,
)
from gti_jax.train.runlog import atomic_write_json  # noqa: E402

__all__ = [
    "ARMS",
    "Arm",
    "ExperimentError",
    "RunSpec",
    "arm_overrides",
    "collect",
    "main",
    "plan",
    "write_report",
]

EXPERIMENT_FILE = "experiment.json"
PREEMPTED_EXIT_CODE = 75
_SET_BY_EXPERIMENT = ("seed", "run_dir", "init", "sft.aux_pairs_ratio")


class ExperimentError(ValueError):
    """Bad input to the experiment (one line naming the problem and the fix)."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of the experiment.

    Attributes:
      name: the arm's name (also its directory under the experiment directory).
      init: the initializer of the new rows.
      ground: whether the arm runs the grounding (GTI) stage.
      aux: whether SFT mixes in the paired prompts (``sft.aux_pairs_ratio > 0``).
      sft_extra: whether SFT gets ``ground.steps`` extra steps (the compute-matched control).
      about: one line for the report.
    """

    name: str
    init: str
    ground: bool = False
    aux: bool = False
    sft_extra: bool = False
    about: str = ""


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("mean", "mean", about="mean init, then SFT"),
        Arm("mean_noise", "mean_noise", about="mean + Gaussian noise init, then SFT"),
        Arm("description", "description", about="description-average init, then SFT"),
        Arm("mean+gti", "mean", ground=True, about="mean init, grounding (GTI), then SFT"),
        Arm(
            "description+gti",
            "description",
            ground=True,
            about="description init, grounding (GTI), then SFT",
        ),
        Arm(
            "mean+aux",
            "mean",
            aux=True,
            about="mean init, SFT mixed with paired text<->ID prompts (LC-Rec style)",
        ),
        Arm(
            "mean+sft_extra",
            "mean",
            sft_extra=True,
            about="mean init, SFT with the grounding steps added (compute-matched control)",
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One arm x seed: its run directory and its resolved trainer config."""

    arm: str
    seed: int
    run_dir: Path
    cfg: TrainConfig

    @property
    def key(self) -> str:
        return f"{self.arm}/seed{self.seed}"

    @property
    def done(self) -> bool:
        return (self.run_dir / "results.json").is_file()


def _log(msg: str) -> None:
    print(f"[experiment] {msg}", file=sys.stderr, flush=True)


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# --------------------------------------------------------------------------------------------
# Planning.
# --------------------------------------------------------------------------------------------


def arm_overrides(arm: Arm, base: TrainConfig, *, aux_ratio: float) -> list[str]:
    """The dotted overrides that turn the base config into ``arm``.

    Args:
      arm: the arm.
      base: the resolved base config (its ``ground.steps`` is the grounding budget, its
        ``sft.steps`` the SFT budget every arm shares).
      aux_ratio: ``sft.aux_pairs_ratio`` of the ``aux`` arm.

    Returns:
      ``key=value`` strings.

    >>> arm_overrides(ARMS["mean+sft_extra"], TrainConfig(), aux_ratio=0.2)
    ['init=mean', 'ground.steps=0', 'sft.aux_pairs_ratio=0.0', 'sft.steps=300']
    """
    g, s = base.ground.steps, base.sft.steps
    out = [
        f"init={arm.init}",
        f"ground.steps={g if arm.ground else 0}",
        f"sft.aux_pairs_ratio={aux_ratio if arm.aux else 0.0}",
    ]
    if arm.sft_extra:
        out.append(f"sft.steps={s + g}")
    return out


def _parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ExperimentError(f"--{what} is empty; give a comma-separated list")
    if len(set(items)) != len(items):
        raise ExperimentError(f"--{what} lists an entry twice: {text}")
    return items


def plan(
    config: str | None,
    overrides: Sequence[str],
    arms: Sequence[str],
    seeds: Sequence[int],
    out: str | os.PathLike,
    *,
    aux_ratio: float = 0.2,
) -> list[RunSpec]:
    """Resolves every arm x seed into a checked trainer config (no heavy work).

    Args:
      config: the base YAML (a plain trainer config), or None for the trainer defaults.
      overrides: ``key=value`` overrides applied to every run (before the arm's own).
      arms: arm names (keys of :data:`ARMS`).
      seeds: training seeds (>= 0).
      out: the experiment directory.
      aux_ratio: ``sft.aux_pairs_ratio`` of the ``mean+aux`` arm, in (0, 1).

    Returns:
      One :class:`RunSpec` per seed x arm, seed-major (every arm of the first seed first).

    Raises:
      ExperimentError: an unknown arm, a negative or repeated seed, an override of a key the
        experiment sets, a base config without the grounding budget the arms need.
      ConfigError: a bad config file, key or value.
    """
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ExperimentError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ExperimentError(f"--seeds must be distinct integers >= 0, got {list(seeds)}")
    for item in overrides:
        key = item.split("=", 1)[0].strip().removeprefix("--")
        if key in _SET_BY_EXPERIMENT:
            raise ExperimentError(
                f"override {item!r}: the experiment sets {key} itself (use --seeds, --out, "
                "--arms or --aux-ratio); drop it"
            )
    if not 0 < aux_ratio < 1:
        raise ExperimentError(f"--aux-ratio must be in (0, 1), got {aux_ratio}")
    base = load_config(config, list(overrides))
    needs_ground = [a for a in arms if ARMS[a].ground or ARMS[a].sft_extra]
    if needs_ground and base.ground.steps == 0:
        raise ExperimentError(
            f"ground.steps is 0 in the base config, but arm(s) {', '.join(needs_ground)} need "
            "the grounding budget; set ground.steps > 0"
        )
    if base.sft.steps == 0:
        raise ExperimentError("sft.steps is 0 in the base config; every arm fine-tunes")
    rec_seed = base.rec.seed if base.rec.seed is not None else base.seed
    out = Path(out)
    specs = []
    for seed in seeds:
        for name in arms:
            run_dir = out / name / f"seed{seed}"
            cfg = load_config(
                config,
                [
                    *overrides,
                    *arm_overrides(ARMS[name], base, aux_ratio=aux_ratio),
                    f"seed={seed}",
                    f"rec.seed={rec_seed}",
                    f"run_dir={run_dir}",
                    "resume=true",
                ],
            )
            specs.append(RunSpec(name, seed, run_dir, cfg))
    return specs


# --------------------------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------------------------


def _hardware() -> dict[str, Any]:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": dev[0].device_kind,
        "devices": len(dev),
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _shared_data(specs: Sequence[RunSpec], out: Path) -> Path | None:
    """Prepares ``<out>/data`` once (when the runs use the built-in data) and links it."""
    pending = [s for s in specs if not s.done]
    if not pending or pending[0].cfg.data.tokens is not None:
        return None
    from gti_jax.rec.prepare import prepare

    data = out / "data"
    _log(f"shared data: {data} (rec.seed={pending[0].cfg.rec.seed}, same for every run)")
    prepare(pending[0].cfg, data)
    for s in pending:
        s.run_dir.mkdir(parents=True, exist_ok=True)
        link = s.run_dir / "data"
        if link.is_symlink() or link.exists():
            continue  # already linked (or a run's own prepared copy, checked by the trainer)
        try:
            link.symlink_to(os.path.relpath(data, s.run_dir), target_is_directory=True)
        except OSError:  # no symlinks here: a copy has the same recorded settings
            shutil.copytree(data, link)
    return data


def _eta(specs: Sequence[RunSpec], times: dict[str, float], left: Sequence[RunSpec]) -> str:
    """Remaining time: each run left x the mean time of finished runs of its arm (or all)."""
    done = {k: v for k, v in times.items() if v > 0}
    if not done or not left:
        return "?" if left else "0m00s"
    overall = float(np.mean(list(done.values())))
    total = 0.0
    for s in left:
        same = [v for k, v in done.items() if k.split("/")[0] == s.arm]
        total += float(np.mean(same)) if same else overall
    return _fmt_s(total)


def _compile_cache(out: Path) -> None:
    """Caches compiled steps in ``<out>/jax_cache`` so that runs after the first skip most
    compilation (same shapes across arms and seeds); a cache the user set is kept."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str((out / "jax_cache").resolve()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run_all(
    specs: Sequence[RunSpec],
    out: Path,
    *,
    command: str,
    settings: dict[str, Any] | None = None,
    keep_checkpoints: bool = False,
) -> list[str]:
    """Runs every spec not yet done, in order; returns the keys of the runs that failed.

    Raises:
      SystemExit: with :data:`PREEMPTED_EXIT_CODE` when a run was stopped by SIGTERM.
    """
    from gti_jax.pipeline import run
    from gti_jax.train.run import Preempted, TrainError

    meta_path = out / EXPERIMENT_FILE
    meta = _read_json(meta_path) or {}
    meta.setdefault("invocations", []).append(
        {
            "command": command,
            "settings": settings or {},
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "hardware": _hardware(),
        }
    )
    times: dict[str, float] = meta.setdefault("seconds", {})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, meta)

    for s in specs:  # runs done before this experiment's bookkeeping: their own timing
        if s.done and s.key not in times:
            r = _read_json(s.run_dir / "results.json") or {}
            times[s.key] = float(r.get("wall_seconds", 0.0))
    todo = [s for s in specs if not s.done]
    if len(todo) < len(specs):
        _log(f"{len(specs) - len(todo)} of {len(specs)} runs already complete: skipped")
    if not todo:
        return []
    _compile_cache(out)
    _shared_data(specs, out)
    t_start = time.perf_counter()
    failed = []
    for i, s in enumerate(todo):
        n_done = len(specs) - len(todo) + i
        _log(
            f"run {n_done + 1}/{len(specs)}: {s.key} -> {s.run_dir} "
            f"(elapsed {_fmt_s(time.perf_counter() - t_start)}, ETA {_eta(specs, times, todo[i:])})"
        )
        t0 = time.perf_counter()
        try:
            res = run(s.cfg)
            status = f"Recall@{s.cfg.eval.k[0]} {res.get(f'recall@{s.cfg.eval.k[0]}', 'n/a')}"
        except Preempted as e:
            times[s.key] = times.get(s.key, 0.0) + time.perf_counter() - t0
            atomic_write_json(meta_path, meta)
            _log(f"stopped: {e}")
            raise SystemExit(PREEMPTED_EXIT_CODE) from None
        except (TrainError, ValueError, FileNotFoundError) as e:
            failed.append(s.key)
            status = f"FAILED: {e}"
        times[s.key] = times.get(s.key, 0.0) + time.perf_counter() - t0
        atomic_write_json(meta_path, meta)
        if s.done and not keep_checkpoints:
            ckpt = Path(s.cfg.checkpoint.dir) if s.cfg.checkpoint.dir else s.run_dir / "checkpoints"
            shutil.rmtree(ckpt, ignore_errors=True)
        left = todo[i + 1 :]
        _log(
            f"{n_done + 1}/{len(specs)} {s.key} in {_fmt_s(time.perf_counter() - t0)}: {status}; "
            f"elapsed {_fmt_s(time.perf_counter() - t_start)}, ETA {_eta(specs, times, left)} "
            f"({len(left)} runs left)"
        )
        gc.collect()  # compiled functions stay cached: later runs reuse them
    return failed


# --------------------------------------------------------------------------------------------
# Collecting and reporting.
# --------------------------------------------------------------------------------------------


def _stat(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std (nan for one value), n) of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)


def collect(specs: Sequence[RunSpec], out: Path) -> dict[str, Any]:
    """Reads every finished run: results, diagnostics and wall time, grouped by arm.

    Returns:
      ``{"arms": {arm: {"seeds": [...], "results": [...], "diagnostics": [...],
      "seconds": [...], "run_dirs": [...]}}, "ks", "popularity", "missing", "meta",
      "prepare_stats"}``.
    """
    meta = _read_json(out / EXPERIMENT_FILE) or {}
    times = meta.get("seconds", {})
    arms: dict[str, dict[str, list]] = {}
    missing = []
    popularity = None
    for s in specs:
        a = arms.setdefault(
            s.arm,
            {
                "seeds": [],
                "results": [],
                "diagnostics": [],
                "seconds": [],
                "run_dirs": [],
                "ranks": [],
            },
        )
        res = _read_json(s.run_dir / "results.json") if s.done else None
        if res is None:
            missing.append(s.key)
            continue
        a["seeds"].append(s.seed)
        a["results"].append(res)
        a["diagnostics"].append(_read_json(s.run_dir / "diagnostics.json") or {})
        a["seconds"].append(float(times.get(s.key, res.get("wall_seconds", float("nan")))))
        a["run_dirs"].append(s.run_dir)
        a["ranks"].append(_read_json(s.run_dir / "eval_ranks.json"))  # None for older runs
        popularity = popularity or res.get("popularity_baseline")
    stats_file = out / "data" / "prepare_stats.json"
    return {
        "arms": arms,
        "ks": tuple(specs[0].cfg.eval.k),
        "popularity": popularity,
        "missing": missing,
        "meta": meta,
        "prepare_stats": _read_json(stats_file) if stats_file.is_file() else None,
    }


def _num(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _pm(values: Sequence[float], digits: int = 4) -> str:
    m, sd, n = _stat(values)
    if n == 0:
        return "n/a"
    if n == 1:
        return f"{m:.{digits}f} (1 seed)"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def _metric(arm: dict, key: str) -> list[float]:
    return [r.get(key) for r in arm["results"]]


def _diag(arm: dict, stage: str, key: str) -> list[float]:
    return [(d.get(stage) or {}).get(key) for d in arm["diagnostics"]]


def _compare(a: dict, b: dict, key: str) -> dict[str, float]:
    """Mean difference a - b, pooled std, and Welch's t = diff / sqrt(sa²/na + sb²/nb)."""
    ma, sa, na = _stat(_metric(a, key))
    mb, sb, nb = _stat(_metric(b, key))
    diff = ma - mb
    pooled = math.sqrt((sa**2 + sb**2) / 2) if na > 1 and nb > 1 else float("nan")
    se = math.sqrt(sa**2 / na + sb**2 / nb) if na > 1 and nb > 1 else float("nan")
    t = diff / se if se and math.isfinite(se) and se > 0 else float("nan")
    return {"a": ma, "b": mb, "diff": diff, "pooled": pooled, "t": t, "na": na, "nb": nb}


def _verdict(name_a: str, name_b: str, c: dict, label: str) -> tuple[str, bool]:
    """One line judging ``a - b``, and whether a beats b by more than the seed noise."""
    if not math.isfinite(c["diff"]):
        return f"- {name_a} vs {name_b} ({label}): not enough finished runs to compare.", False
    sign = "beats" if c["diff"] > 0 else "does not beat" if c["diff"] < 0 else "ties"
    clear = False
    if not math.isfinite(c["t"]):
        if c["diff"] == 0 and c["na"] > 1 and c["nb"] > 1:
            strength = "identical over seeds"
        else:
            strength = "no seed spread to judge significance (fewer than 2 seeds or zero std)"
    elif abs(c["t"]) >= 2:
        strength = f"t = {c['t']:.2f}, |t| >= 2: larger than the seed-to-seed noise"
        clear = c["diff"] > 0
    elif abs(c["t"]) >= 1:
        strength = f"t = {c['t']:.2f}, 1 <= |t| < 2: a weak indication only"
    else:
        strength = f"t = {c['t']:.2f}, |t| < 1: within the seed-to-seed noise"
    line = (
        f"- **{name_a}** {sign} **{name_b}** on {label}: {_num(c['a'])} vs {_num(c['b'])} "
        f"(difference {c['diff']:+.4f}, pooled std {_num(c['pooled'])}; {strength})."
    )
    return line, clear


def _paired(a: dict, b: dict, k: int) -> dict[str, Any] | None:
    """Per-user paired tests of arm a vs arm b at K over the seeds both finished.

    McNemar's exact test on hit@K pools every (user, seed) pair; the paired bootstrap
    resamples users, each scored by their hit@K / NDCG@K averaged over the seeds.
    """
    ra = {s: r for s, r in zip(a["seeds"], a["ranks"], strict=True) if r}
    rb = {s: r for s, r in zip(b["seeds"], b["ranks"], strict=True) if r}
    seeds = sorted(set(ra) & set(rb))
    if not seeds or any(ra[s]["targets"] != rb[s]["targets"] for s in seeds):
        return None  # no per-user ranks, or not the same users
    hits = lambda r: np.stack([hits_at_k(r[s]["ranks"], k) for s in seeds])  # noqa: E731
    ndcg = lambda r: np.stack([ndcg_at_k_per_user(r[s]["ranks"], k) for s in seeds])  # noqa: E731
    return {
        "seeds": seeds,
        "users": len(ra[seeds[0]]["targets"]),
        "mcnemar": mcnemar_exact(hits(ra).ravel(), hits(rb).ravel()),
        "recall": paired_bootstrap(hits(ra), hits(rb)),
        "ndcg": paired_bootstrap(ndcg(ra), ndcg(rb)),
    }


def _paired_lines(present: dict, pairs: Sequence[tuple[str, str]], k: int) -> list[str]:
    lines = []
    for a, b in pairs:
        if a not in present or b not in present:
            continue
        t = _paired(present[a], present[b], k)
        if t is None:
            lines.append(f"- {a} vs {b}: no per-user ranks on the same users (eval_ranks.json).")
            continue
        m, r, n = t["mcnemar"], t["recall"], t["ndcg"]
        lines.append(
            f"- **{a}** vs **{b}** ({t['users']} users x seeds {t['seeds']}): hit@{k} only "
            f"{a} {m['a_only']}, only {b} {m['b_only']}, McNemar p = {m['p']:.3g}; "
            f"Recall@{k} difference {r['diff']:+.4f} (95% CI {r['ci_low']:+.4f} .. "
            f"{r['ci_high']:+.4f}, bootstrap p = {r['p']:.3g}); NDCG@{k} difference "
            f"{n['diff']:+.4f} (bootstrap p = {n['p']:.3g})."
        )
    return lines


def _conclusion(data: dict[str, Any]) -> list[str]:
    arms, ks, pop = data["arms"], data["ks"], data["popularity"]
    present = {k: v for k, v in arms.items() if v["results"]}
    lines: list[str] = []
    if not present:
        return ["No run has finished yet; nothing to conclude."]
    for k in ks:
        for metric in ("recall", "ndcg"):
            key = f"{metric}@{k}"
            means = {a: _stat(_metric(v, key))[0] for a, v in present.items()}
            means = {a: m for a, m in means.items() if math.isfinite(m)}
            if not means:
                continue
            ranked = sorted(means, key=means.get, reverse=True)
            top = [a for a in ranked if means[a] == means[ranked[0]]]
            best = " = ".join(top) + (" (tied)" if len(top) > 1 else "")
            rest = [a for a in ranked if a not in top]
            runner = f"; next: {rest[0]} {means[rest[0]]:.4f}" if rest else ""
            extra = ""
            if pop and key in pop:
                rel = "above" if means[top[0]] > pop[key] else "not above"
                extra = f"; {rel} the popularity baseline ({pop[key]:.4f})"
            lines.append(
                f"- Best at {metric.upper() if metric == 'ndcg' else 'Recall'}@{k}: **{best}** "
                f"({means[top[0]]:.4f}{runner}{extra})."
            )
    k_mid = 10 if 10 in ks else ks[len(ks) // 2]
    pairs = [
        ("mean+gti", "mean"),
        ("mean+gti", "mean+sft_extra"),
        ("mean+gti", "mean+aux"),
        ("mean+gti", "mean_noise"),
        ("description+gti", "description"),
        ("description+gti", "mean+sft_extra"),
    ]
    comps = []
    for a, b in pairs:
        if a in present and b in present:
            for metric in ("recall", "ndcg"):
                label = f"{'Recall' if metric == 'recall' else 'NDCG'}@{k_mid}"
                c = _compare(present[a], present[b], f"{metric}@{k_mid}")
                comps.append(_verdict(a, b, c, label))
    if comps:
        lines += [
            "",
            f"GTI against the other arms at K = {k_mid} (t is Welch's statistic over seeds: "
            "the mean difference over its standard error; with 2-3 seeds |t| >= 2 is a rough "
            "indication, not a formal test):",
            "",
            *(text for text, _ in comps),
        ]
        paired = _paired_lines(present, pairs, k_mid)
        if paired:
            lines += [
                "",
                f"Paired per-user tests at K = {k_mid} (the arms rank the same users: McNemar's "
                "exact test on hit@K over (user, seed) pairs; a paired bootstrap over users of "
                "the seed-averaged score, 10,000 resamples):",
                "",
                *paired,
            ]
        gti = [a for a in ("mean+gti", "description+gti") if a in present]
        wins = [text for text, clear in comps if clear]
        if gti:
            lines += [
                "",
                (
                    f"Summary: GTI wins {len(wins)} of {len(comps)} comparisons above by more "
                    "than the seed noise."
                    if wins
                    else "Summary: GTI does not win any comparison above by more than the seed "
                    "noise in this configuration."
                ),
            ]
    # diagnostics: the rank collapse GTI is meant to fix
    if "mean" in present and "mean+gti" in present:
        rm = _stat(_diag(present["mean"], "sft", "effective_rank"))[0]
        rg = _stat(_diag(present["mean+gti"], "sft", "effective_rank"))[0]
        if math.isfinite(rm) and math.isfinite(rg):
            word = "higher" if rg > rm else "not higher"
            lines += [
                "",
                f"Diagnostics: after SFT, the new-token embeddings of mean+gti have {word} "
                f"effective rank than those of mean ({rg:.1f} vs {rm:.1f}).",
            ]
        pm = _stat(_diag(present["mean"], "sft", "rsa_spearman"))[0]
        pg = _stat(_diag(present["mean+gti"], "sft", "rsa_spearman"))[0]
        if math.isfinite(pm) and math.isfinite(pg):
            word = "more" if pg > pm else "not more"
            lines.append(
                f"Their cosine structure after SFT is {word} aligned with the semantic-ID "
                f"codebooks (RSA Spearman {pg:.3f} vs {pm:.3f})."
            )
    return lines


def _slug(arm: str) -> str:
    return arm.replace("+", "-")


def _plots(data: dict[str, Any], fig_dir: Path, rel: str) -> list[str]:
    """Draws the combined plots and copies one seed's per-run PNGs; returns markdown lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = {a: v for a, v in data["arms"].items() if v["results"]}
    if not arms:
        return []
    fig_dir.mkdir(parents=True, exist_ok=True)
    ks = data["ks"]
    k_mid = 10 if 10 in ks else ks[len(ks) // 2]
    lines = []

    names = list(arms)
    stats = [_stat(_metric(arms[a], f"recall@{k_mid}")) for a in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 4))
    means = [s[0] for s in stats]
    errs = [s[1] if math.isfinite(s[1]) else 0.0 for s in stats]
    ax.bar(range(len(names)), means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
    pop = data["popularity"]
    if pop and f"recall@{k_mid}" in pop:
        ax.axhline(pop[f"recall@{k_mid}"], color="tab:red", ls="--", label="popularity")
        ax.legend()
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(f"Recall@{k_mid} (mean ± std over seeds)")
    ax.set_title(f"Recall@{k_mid} per arm")
    fig.tight_layout()
    fig.savefig(fig_dir / f"recall{k_mid}_by_arm.png")
    plt.close(fig)
    lines.append(
        f"![Recall@{k_mid} per arm]({rel}/recall{k_mid}_by_arm.png)  \n"
        f"*Recall@{k_mid} per arm: bars are the mean over seeds, error bars one standard "
        "deviation, the dashed line the popularity baseline.*"
    )

    stages = ["init", "ground", "sft"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for a in names:
        xs, ys = [], []
        for i, st in enumerate(stages):
            m = _stat(_diag(arms[a], st, "effective_rank"))[0]
            if math.isfinite(m):
                xs.append(i)
                ys.append(m)
        if xs:
            ax.plot(xs, ys, marker="o", label=a)
    ax.set_xticks(range(len(stages)), ["after init", "after grounding", "after SFT"])
    ax.set_ylabel("effective rank of the new-token embeddings")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Effective rank by stage (mean over seeds)")
    fig.tight_layout()
    fig.savefig(fig_dir / "effective_rank_by_stage.png")
    plt.close(fig)
    lines.append(
        f"![Effective rank by stage]({rel}/effective_rank_by_stage.png)  \n"
        "*Effective rank (Roy & Vetterli) of the new-token rows after each stage, mean over "
        "seeds; arms without grounding skip the middle point.*"
    )

    lines += [
        "",
        "Per-arm figures of the first finished seed (copied from its run directory): "
        "singular-value spectra of the new-token rows per stage, and the new-new cosine "
        "matrix after SFT ordered by semantic ID (blocks = shared code prefixes).",
        "",
        "| arm | seed | spectra | new-new cosine after SFT |",
        "|---|---|---|---|",
    ]
    for a in names:
        run_dir, seed = arms[a]["run_dirs"][0], arms[a]["seeds"][0]
        cells = []
        for src, dst in (
            ("spectra.png", f"spectra_{_slug(a)}.png"),
            ("new_cosine_sft.png", f"new_cosine_sft_{_slug(a)}.png"),
        ):
            if (run_dir / src).is_file():
                shutil.copyfile(run_dir / src, fig_dir / dst)
                cells.append(f"![{a} {src}]({rel}/{dst})")
            else:
                cells.append("(not drawn)")
        lines.append(f"| {a} | {seed} | {cells[0]} | {cells[1]} |")
    return lines


def write_report(
    specs: Sequence[RunSpec],
    out: Path,
    report: Path,
    *,
    config: str | None,
    overrides: Sequence[str],
    aux_ratio: float,
    report_command: str,
) -> Path:
    """Writes the markdown report (and its figures under ``<report dir>/results/``).

    Args:
      specs: the planned runs (finished ones are reported, the others listed as missing).
      out: the experiment directory.
      report: the markdown file to write.
      config: the base config file (for the CPU/GPU label and provenance).
      overrides: the overrides given to every run.
      aux_ratio: the ``mean+aux`` arm's ``sft.aux_pairs_ratio``.
      report_command: the command that writes this report.

    Returns:
      ``report``.
    """
    data = collect(specs, out)
    meta = data["meta"]
    invocations = meta.get("invocations", [])
    hw = invocations[-1]["hardware"] if invocations else _hardware()
    cfg_name = Path(config).name.lower() if config else ""
    label = "GPU" if "gpu" in cfg_name else "CPU" if "cpu" in cfg_name else hw["backend"].upper()
    base = specs[0].cfg
    ks = data["ks"]
    arms = data["arms"]
    seeds = sorted({s.seed for s in specs})
    fig_dir = report.parent / "results"
    rel = os.path.relpath(fig_dir, report.parent)

    L: list[str] = []
    L += [
        f"# GTI experiment: {Path(str(base.model)).name} on {base.rec.dataset} "
        f"({label} configuration)",
        "",
        f"> **{label} configuration** (`{config or 'trainer defaults'}`), run on "
        f"{hw['backend']} ({hw['device_kind']}). Report written "
        f"{datetime.datetime.now().isoformat(timespec='seconds')} by `{report_command}`.",
        "",
        "Question: does grounding the new semantic-ID tokens (GTI: train only the new "
        "embedding rows on paired text <-> ID prompts, backbone frozen) before fine-tuning "
        "beat the usual initializations, the LC-Rec-style multi-task SFT, and a control that "
        "spends the grounding steps on more SFT instead?",
        "",
        "## Setup",
        "",
        f"- Model `{base.model}`; data `{base.rec.dataset}`"
        + (
            f" (max_history {base.rec.max_history}, {base.rec.levels} levels x "
            f"{base.rec.codebook_size} codes, {base.rec.semantic_ids})"
            if base.data.tokens is None
            else f" (files: data.tokens={base.data.tokens})"
        )
        + f"; data.max_len {base.data.max_len}.",
        f"- SFT, the same for every arm: {base.sft.steps} steps, batch {base.sft.batch_size}, "
        f"lr {base.sft.lr}, "
        + (
            f"LoRA r={base.sft.lora_rank} alpha={base.sft.lora_alpha} (embeddings trainable)"
            if base.sft.lora_rank
            else "full fine-tuning"
        )
        + ".",
        f"- Grounding (the +gti arms): {_ground_steps(specs)} steps, batch "
        f"{base.ground.batch_size}, lr {base.ground.lr}; mean+sft_extra gets the same number "
        "of extra SFT steps (matched in optimizer steps; grounding steps are cheaper, since "
        "only the new rows get gradients).",
        f"- mean+aux: sft.aux_pairs_ratio = {aux_ratio}.",
        f"- Evaluation: constrained beam search, {base.eval.beams} beams, "
        f"{_num_eval(arms, base)} test examples, K = {', '.join(map(str, ks))}.",
        f"- Seeds {', '.join(map(str, seeds))}: the seed changes the init noise (mean_noise), "
        "the batch order, the LoRA initialization and dropout. It does not change the data "
        f"split or the semantic IDs: every run uses rec.seed = {base.rec.seed} and one shared "
        "prepared data directory.",
    ]
    ps = data["prepare_stats"]
    if ps:
        f = ps["dataset"]["filtered"]
        L.append(
            f"- Data after filtering: {f['users']} users, {f['items']} items, "
            f"{f['interactions']} interactions; {ps['new_tokens']} new tokens; "
            f"{ps['examples']['sft']} SFT examples, {ps['examples']['test']} test examples."
        )
    L += [
        "",
        "| arm | what | grounding steps | SFT steps | aux ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for name in dict.fromkeys(s.arm for s in specs):
        c = next(s.cfg for s in specs if s.arm == name)
        L.append(
            f"| {name} | {ARMS[name].about} | {c.ground.steps} | {c.sft.steps} | "
            f"{c.sft.aux_pairs_ratio} |"
        )

    # results
    L += ["", "## Results (test set, mean ± std over seeds)", ""]
    head = ["arm", "seeds"]
    for k in ks:
        head += [f"Recall@{k}", f"NDCG@{k}"]
    head += ["valid-ID rate", "exact match", "eval loss"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for name, a in arms.items():
        row = [name, str(len(a["results"]))]
        for k in ks:
            row += [_pm(_metric(a, f"recall@{k}")), _pm(_metric(a, f"ndcg@{k}"))]
        row += [
            _pm(_metric(a, "valid_rate"), 3),
            _pm(_metric(a, "exact_match"), 3),
            _pm(_metric(a, "eval_loss"), 3),
        ]
        L.append("| " + " | ".join(row) + " |")
    pop = data["popularity"]
    if pop:
        row = ["popularity baseline", "-"]
        for k in ks:
            row += [_num(pop.get(f"recall@{k}")), _num(pop.get(f"ndcg@{k}"))]
        L.append("| " + " | ".join(row + ["-", "-", "-"]) + " |")
        L += [
            "",
            "The popularity baseline ranks every item by its count in the training part of "
            "each user's history (the same test users).",
        ]
    else:
        L += ["", "No popularity baseline: the runs used data.* files, not prepared data."]
    if data["missing"]:
        L += ["", f"Not finished (left out of the means): {', '.join(data['missing'])}."]

    # diagnostics
    L += [
        "",
        "## New-token diagnostics (mean over seeds)",
        "",
        "| arm | eff. rank init | eff. rank ground | eff. rank SFT | mean cos SFT | "
        "RSA Pearson SFT | RSA Spearman SFT |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in arms.items():
        r = [_num(_stat(_diag(a, st, "effective_rank"))[0], 1) for st in ("init", "ground", "sft")]
        r += [
            _num(_stat(_diag(a, "sft", key))[0], 3)
            for key in ("mean_cos", "rsa_pearson", "rsa_spearman")
        ]
        L.append(f"| {name} | " + " | ".join(r) + " |")
    L += [
        "",
        "Effective rank: exp of the entropy of the normalized singular values of the new-token "
        "rows (1 = all rows on one line). Mean cos: mean pairwise cosine among new tokens. RSA: "
        "correlation between the cosine matrices of the learned rows and of the semantic-ID "
        "codebook vectors (n/a: no codebook, e.g. data.* files). n/a in the ground column: no "
        "grounding stage.",
    ]

    # plots
    plot_lines = _plots(data, fig_dir, rel)
    if plot_lines:
        L += ["", "## Figures", "", *plot_lines]

    # conclusion
    L += ["", "## Conclusion (computed from the numbers above)", "", *_conclusion(data)]

    # provenance
    total = sum(sum(a["seconds"]) for a in arms.values())
    L += [
        "",
        "## Wall time",
        "",
        "| arm | runs | per run (mean ± std) | total |",
        "|---|---:|---:|---:|",
    ]
    for name, a in arms.items():
        m, sd, n = _stat(a["seconds"])
        per = _fmt_s(m) if n else "n/a"
        if n > 1:
            per += f" ± {_fmt_s(sd)}"
        L.append(f"| {name} | {n} | {per} | {_fmt_s(sum(a['seconds']))} |")
    L += [
        f"| **all** | {sum(len(a['results']) for a in arms.values())} | | **{_fmt_s(total)}** |",
        "",
        "Times are summed over every invocation that worked on a run (a resumed run counts "
        "each part), and include the compilation of the steps.",
        "",
        "## Provenance",
        "",
        "Command(s) that ran the experiment:",
        "",
        "```",
        *([inv["command"] for inv in invocations] or [report_command]),
        "```",
        "",
        f"- Hardware: {hw['cpu']}, {hw['cores']} cores; jax {hw['jax']} on {hw['backend']} "
        f"({hw['devices']} x {hw['device_kind']}); Python {hw['python']}; {hw['platform']}.",
        f"- Base config: `{config or 'trainer defaults'}`"
        + (f" with overrides `{' '.join(overrides)}`" if overrides else "")
        + f"; each run's resolved config is `{out}/<arm>/seed<k>/config.yaml`.",
        f"- Experiment directory: `{out}`; rebuild this report with `python "
        f"scripts/experiment.py --out {out} --report {report} --report-only` (same --config, "
        "--arms, --seeds and overrides).",
        "",
    ]
    report.parent.mkdir(parents=True, exist_ok=True)
    tmp = report.with_name(f".{report.name}.tmp")
    tmp.write_text("\n".join(L), encoding="utf-8")
    os.replace(tmp, report)
    return report


def _num_eval(arms: dict[str, Any], base: TrainConfig) -> str:
    counts = {r.get("num_eval") for a in arms.values() for r in a["results"]} - {None}
    if len(counts) == 1:
        return str(counts.pop())
    return str(base.eval.max_examples) if base.eval.max_examples is not None else "all"


def _ground_steps(specs: Sequence[RunSpec]) -> int:
    steps = [s.cfg.ground.steps for s in specs if s.cfg.ground.steps > 0]
    return steps[0] if steps else 0


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


_DEFAULTS = {
    "config": "configs/experiment_cpu.yaml",
    "arms": ",".join(ARMS),
    "seeds": "0,1,2",
    "aux_ratio": 0.2,
    "overrides": [],
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python scripts/experiment.py",
        description="Runs the GTI experiment (arms x seeds) and writes the report. With "
        "--report-only, options not given are taken from the last run of the experiment "
        "recorded in <out>/experiment.json.",
    )
    p.add_argument("--config", help=f"base trainer YAML (default {_DEFAULTS['config']})")
    p.add_argument("--out", default="runs/experiment", help="experiment directory")
    p.add_argument("--arms", help=f"comma-separated, default all: {_DEFAULTS['arms']}")
    p.add_argument("--seeds", help=f"comma-separated training seeds (default {_DEFAULTS['seeds']})")
    p.add_argument(
        "--aux-ratio",
        type=float,
        help=f"sft.aux_pairs_ratio of mean+aux ({_DEFAULTS['aux_ratio']})",
    )
    p.add_argument("--report", default="docs/results.md", help="markdown report to write")
    p.add_argument("--report-only", action="store_true", help="rebuild the report, run nothing")
    p.add_argument(
        "--keep-checkpoints", action="store_true", help="keep finished runs' checkpoints"
    )
    p.add_argument("overrides", nargs="*", help="key=value trainer overrides for every run")
    return p


def _settings(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The experiment's settings: given options, else (report-only) recorded, else defaults."""
    recorded: dict[str, Any] = {}
    if args.report_only:
        meta = _read_json(out / EXPERIMENT_FILE) or {}
        runs = [i for i in meta.get("invocations", []) if "settings" in i]
        recorded = runs[-1]["settings"] if runs else {}
    given = {
        "config": args.config,
        "arms": args.arms,
        "seeds": args.seeds,
        "aux_ratio": args.aux_ratio,
        "overrides": args.overrides or None,
    }
    return {k: v if v is not None else recorded.get(k, _DEFAULTS[k]) for k, v in given.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    command = "python scripts/experiment.py " + shlex.join(argv)
    out = Path(args.out)
    st = _settings(args, out)
    try:
        arms = _parse_list(st["arms"], "arms")
        try:
            seeds = [int(x) for x in _parse_list(st["seeds"], "seeds")]
        except ValueError:
            raise ExperimentError(f"--seeds must be integers, got {st['seeds']!r}") from None
        bad = [o for o in st["overrides"] if "=" not in o]
        if bad:
            raise ExperimentError(f"argument {bad[0]!r} is not key=value; e.g. sft.steps=50")
        specs = plan(st["config"], st["overrides"], arms, seeds, out, aux_ratio=st["aux_ratio"])
    except (ExperimentError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.report_only:
        if not any(s.done for s in specs):
            print(
                f"error: no finished run under {out} for these arms and seeds; run the "
                "experiment first or fix --out/--arms/--seeds",
                file=sys.stderr,
            )
            return 2
        failed: list[str] = []
    else:
        _log(f"{len(specs)} runs: arms {', '.join(arms)} x seeds {', '.join(map(str, seeds))}")
        try:
            failed = run_all(
                specs,
                out,
                command=command,
                settings=st,
                keep_checkpoints=args.keep_checkpoints,
            )
        except SystemExit as e:
            return int(e.code)
        except (ValueError, FileNotFoundError) as e:  # shared data preparation
            print(f"error: {e}", file=sys.stderr)
            return 2
    path = write_report(
        specs,
        out,
        Path(args.report),
        config=st["config"],
        overrides=st["overrides"],
        aux_ratio=st["aux_ratio"],
        report_command=command,
    )
    _log(f"report: {path}")
    if failed:
        _log(f"{len(failed)} run(s) failed: {', '.join(failed)}; re-run to retry them")
        return 1
    return 0


if __name__ == "__main__":
    from gti_jax._env import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()
    sys.exit(main())
