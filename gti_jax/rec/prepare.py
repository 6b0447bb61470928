"""Recommendation data preparation: dataset -> semantic IDs -> the generic trainer files.

One function, :func:`prepare`, and its CLI, ``python -m gti_jax.rec.prepare``, run the whole
front end in one direction:

1. load the dataset (``rec.dataset``, ``rec.paths``), drop untitled items, keep each user's
   last ``rec.max_sequence_length`` interactions, apply the ``rec.min_interactions`` k-core,
   and split leave-one-out with histories of at most ``rec.max_history`` items;
2. embed every item (``rec.embeddings``: the backbone's mean-pooled final hidden states over
   the item text, see :mod:`gti_jax.rec.embed`, or a ``.npy`` file);
3. quantize the embeddings into semantic IDs (``rec.semantic_ids``: RQ-KMeans or RQ-VAE with
   ``rec.levels`` x ``rec.codebook_size`` codes, plus one disambiguation level when IDs
   collide), so every item gets a unique ID;
4. write the trainer's files (:func:`gti_jax.rec.prompts.write_task_files`), the semantic
   IDs with their codebooks (for the RSA diagnostics) and ``prepare_stats.json``: dataset
   counts, collision rate before resolution, codebook usage, the number of new tokens and
   examples, and the popularity baseline's Recall/NDCG@K on the test file (the number a
   trained model has to beat).

The output is deterministic given the seed and written atomically: everything goes into a
temporary directory beside ``out_dir`` that is renamed into place at the end. A complete
output whose recorded configuration matches is reused as is (:mod:`gti_jax.pipeline` calls
:func:`prepare` again on resume); any other existing output is refused.

Output files (keys of the returned dict): ``tokens.jsonl``, ``pairs.jsonl``, ``sft.jsonl``,
``valid.jsonl``, ``test.jsonl``, ``aux.jsonl``, ``candidates.txt``, ``items.jsonl``,
``semantic_ids/``, ``item_embeddings.npy`` (``[N, D]`` float32, row ``i`` = item ``i``; pass
it as ``rec.embeddings`` to re-quantize without embedding again) and ``prepare_stats.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gti_jax import config as engine
from gti_jax import metrics
from gti_jax.errors import BadInput
from gti_jax.io.atomic import atomic_dir
from gti_jax.rec import data as rd
from gti_jax.rec import prompts
from gti_jax.rec import semantic_ids as sem
from gti_jax.rec.config import PrepareConfig, RecConfig, check_prepare, check_rec

__all__ = [
    "OUTPUT_FILES",
    "PrepareError",
    "format_summary",
    "main",
    "prepare",
]

OUTPUT_FILES: dict[str, str] = {
    "tokens": "tokens.jsonl",
    "pairs": "pairs.jsonl",
    "sft": "sft.jsonl",
    "valid": "valid.jsonl",
    "test": "test.jsonl",
    "aux": "aux.jsonl",
    "candidates": "candidates.txt",
    "items": "items.jsonl",
    "semantic_ids": "semantic_ids",
    "embeddings": "item_embeddings.npy",
    "stats": "prepare_stats.json",
}
_FORMAT_VERSION = 1
_DEFAULT_MAX_LEN = 128  # data.max_len's default, for a bare RecConfig
_PREFIX_ROOM = 8  # tokens a sequence row keeps for rec.sequence_prefix and special tokens
_KS = (5, 10, 20, 50, 100)  # the paper's cut-offs
_ACTIONS = {
    "movielens-100k": "watched",
    "amazon-2014": "purchased",
    "amazon-2018": "purchased",
    "amazon-2023": "purchased",
}


class PrepareError(BadInput):
    """Preparation cannot proceed (bad input, or an output directory that does not fit)."""


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"prepare: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Configuration: what is recorded, what must match on reuse.


def _resolve(cfg: Any, seed: int | None) -> tuple[RecConfig, int, str | None]:
    """Returns (rec config, resolved seed, model name or None)."""
    if isinstance(cfg, RecConfig):
        rec, top_seed, model_name = cfg, 0, None
        check_rec(rec)
    elif isinstance(getattr(cfg, "rec", None), RecConfig):  # a whole run's or PrepareConfig
        rec, top_seed, model_name = cfg.rec, cfg.seed, cfg.model
    else:
        raise PrepareError(
            f"prepare needs a config with a rec section or a RecConfig, got "
            f"{type(cfg).__name__}; build one with gti_jax.pipeline.load_config"
        )
    if rec.seed is not None:
        resolved = rec.seed
    elif seed is not None:
        resolved = int(seed)
    else:
        resolved = top_seed
    if resolved < 0:
        raise PrepareError(f"seed must be >= 0, got {resolved}")
    return rec, resolved, model_name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _recorded_config(
    rec: RecConfig, seed: int, model_name: str | None, max_len: int
) -> dict[str, Any]:
    """The settings that determine the output; a reused output must have recorded the same."""
    d = engine.to_dict(rec)
    d["seed"] = seed
    if rec.task == "sequence" and rec.sequence_items is None:
        d["sequence_max_len"] = max_len  # the rows' length follows data.max_len
    d["paths"] = {k: os.path.abspath(os.path.expanduser(v)) for k, v in sorted(rec.paths.items())}
    out: dict[str, Any] = {"format_version": _FORMAT_VERSION, "rec": d}
    if rec.embeddings == "backbone":
        out["model"] = model_name
    else:
        npy = Path(rec.embeddings).expanduser()
        d["embeddings"] = str(npy.resolve())
        out["embeddings_sha256"] = _sha256(npy) if npy.is_file() else None
    if rec.semantic_ids_file:
        ids = Path(rec.semantic_ids_file).expanduser()
        d["semantic_ids_file"] = str(ids.resolve())
        out["semantic_ids_sha256"] = _sha256(ids) if ids.is_file() else None
    return out


def _paths(out: Path) -> dict[str, Path]:
    return {k: out / name for k, name in OUTPUT_FILES.items()}


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(dict.fromkeys([*old, *new]))
        return [k for key in keys for k in _diff(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _check_existing(out: Path, recorded: dict[str, Any]) -> bool:
    """True if ``out`` is a complete output of this config; False if absent or empty."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise PrepareError(f"{out} exists and is not a directory; choose another output path")
    stats_path = out / OUTPUT_FILES["stats"]
    if not stats_path.is_file():
        if any(out.iterdir()):
            raise PrepareError(
                f"{out} is not empty and holds no {OUTPUT_FILES['stats']}; choose another "
                "output directory or delete it"
            )
        return False
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        old = stats["config"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise PrepareError(
            f"{stats_path} is unreadable or incomplete; delete {out} and prepare again"
        ) from None
    # A setting the record lacks was added to gti_jax later; unset (None), it prepares what
    # the older version did, so only settings whose values differ count.
    differing = _diff(old, recorded)
    if differing:
        keys = ", ".join(differing)
        raise PrepareError(
            f"{out} was prepared with other settings (differing: {keys}); use another output "
            "directory or delete it to prepare again"
        )
    missing = [name for name in OUTPUT_FILES.values() if not (out / name).exists()]
    if missing:
        raise PrepareError(f"{out} lacks {', '.join(missing)}; delete it and prepare again")
    return True


# --------------------------------------------------------------------------------------------
# Steps.


def _check_inputs(rec: RecConfig, model: Any, tokenizer: Any, can_load: bool) -> None:
    """Cheap checks before any heavy work: files exist, .npy is 2-D, a model is available."""
    for key, value in sorted(rec.paths.items()):
        p = Path(value).expanduser()
        if key == "dir":
            if not p.is_dir():
                raise rd.RecFileNotFoundError(f"rec.paths.dir={value}: no such directory")
        elif not p.is_file():
            raise rd.RecFileNotFoundError(f"rec.paths.{key}={value}: no such file; check the path")
    if rec.embeddings == "backbone":
        if (model is None) != (tokenizer is None):
            raise PrepareError("pass both model and tokenizer for rec.embeddings=backbone")
        if model is None and not can_load:
            raise PrepareError(
                "rec.embeddings=backbone needs a model: pass model= and tokenizer=, or a "
                "TrainConfig whose `model` names the checkpoint"
            )
        return
    npy = Path(rec.embeddings).expanduser()
    if not npy.is_file():
        raise rd.RecFileNotFoundError(f"rec.embeddings={rec.embeddings}: no such .npy file")
    try:
        arr = np.load(npy, allow_pickle=False, mmap_mode="r")
    except ValueError as e:
        raise PrepareError(
            f"rec.embeddings={rec.embeddings} is not a plain numeric .npy array ({e}); save it "
            "with np.save"
        ) from None
    if arr.ndim != 2 or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.floating):
        raise PrepareError(
            f"rec.embeddings={rec.embeddings} holds a {arr.dtype} array of shape {arr.shape}; "
            "expected float [num_items, D]"
        )


def _load(rec: RecConfig) -> rd.RecDataset:
    p = {k: Path(v).expanduser() for k, v in rec.paths.items()}
    if rec.dataset == "movielens-100k":
        return rd.load_movielens_100k(p.get("dir"))
    if rec.dataset == "amazon-2014":
        return rd.load_amazon_2014(p["reviews"], p["meta"])
    if rec.dataset == "amazon-2018":
        return rd.load_amazon_2018(p["reviews"], p["meta"])
    if rec.dataset == "amazon-2023":
        return rd.load_amazon_2023(p["reviews"], p["meta"])
    return rd.load_csv(p["interactions"], p["items"])


def _subsample(split: rd.Split, rec: RecConfig, seed: int) -> rd.Split:
    """Seeded subsets of training examples and of evaluation users (order kept)."""
    train, valid, test = split.train, split.valid, split.test
    if rec.max_train_examples is not None and len(train) > rec.max_train_examples:
        rng = np.random.default_rng([seed, 1])
        keep = np.sort(rng.choice(len(train), rec.max_train_examples, replace=False))
        train = [train[i] for i in keep]
    if rec.max_eval_users is not None and len(test) > rec.max_eval_users:
        rng = np.random.default_rng([seed, 2])
        users = [ex.user for ex in test]
        chosen = {users[i] for i in rng.choice(len(users), rec.max_eval_users, replace=False)}
        valid = [ex for ex in valid if ex.user in chosen]
        test = [ex for ex in test if ex.user in chosen]
    return dataclasses.replace(split, train=train, valid=valid, test=test)


def _sequence_items(rec: RecConfig, max_len: int, levels: int) -> int:
    """Items per sequence row: rec.sequence_items, or as many as fit max_len (8 for the prefix)."""
    items = rec.sequence_items or (max_len - _PREFIX_ROOM) // levels
    if items <= rec.sequence_overlap or items < 2:
        raise PrepareError(
            f"rec.task=sequence: {items} item(s) of {levels} tokens fit a row (data.max_len="
            f"{max_len}), not more than rec.sequence_overlap={rec.sequence_overlap}; raise "
            "data.max_len or rec.sequence_items, or lower rec.sequence_overlap"
        )
    return items


def _semantic_ids(x: np.ndarray, rec: RecConfig, seed: int) -> sem.SemanticIds:
    if rec.semantic_ids_file:
        raise AssertionError("imported semantic IDs are read before the embeddings")
    if rec.semantic_ids == "rq_kmeans":
        return sem.rq_kmeans(x, num_levels=rec.levels, codebook_size=rec.codebook_size, key=seed)
    return sem.rq_vae(
        x, num_levels=rec.levels, codebook_size=rec.codebook_size, key=seed, steps=rec.rqvae_steps
    )


def _keep_tokens(path: Path, sizes: Sequence[int]) -> int:
    """Rewrites tokens.jsonl keeping each level's codes below its codebook size; returns count."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    valid = {prompts.code_token(lvl, c) for lvl, k in enumerate(sizes) for c in range(k)}
    kept = [r for r in rows if r["token"] in valid]
    prompts.write_jsonl(path, kept)
    return len(kept)


def _relax_permissions(root: Path) -> None:
    """Gives the temporary tree (created 0700/0600) the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for d, _, files in os.walk(root):
        os.chmod(d, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~umask)


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _round(metrics_dict: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in metrics_dict.items()}


# --------------------------------------------------------------------------------------------
# Public API.


def prepare(
    cfg: Any,
    out_dir: str | os.PathLike,
    *,
    seed: int | None = None,
    model: Any = None,
    tokenizer: Any = None,
    verbose: bool = True,
) -> dict[str, Path]:
    """Prepares a recommendation task: dataset -> semantic IDs -> the trainer's files.

    Args:
        cfg: a :class:`~gti_jax.pipeline.RunConfig` or a
            :class:`~gti_jax.rec.config.PrepareConfig` (its ``rec`` section, ``seed``,
            ``model`` and ``data.max_len`` are used) or a bare
            :class:`~gti_jax.rec.config.RecConfig`.
        out_dir: output directory; created atomically. If it already holds a complete output
            of the same settings, that output is returned without recomputing.
        seed: the seed when ``rec.seed`` is null and ``cfg`` is a ``RecConfig`` (default 0);
            a whole config supplies its top-level ``seed``.
        model: the backbone for ``rec.embeddings=backbone``; with a whole config and no
            model, ``gti_jax.models.load_pretrained(cfg.model)`` is loaded.
        tokenizer: the model's tokenizer (with ``model``).
        verbose: print progress to stderr.

    Returns:
        ``{"tokens", "pairs", "sft", "valid", "test", "aux", "candidates", "items",
        "semantic_ids", "embeddings", "stats"}`` -> path (``semantic_ids`` is a directory).

    Raises:
        PrepareError: an existing ``out_dir`` that does not match, a bad ``.npy``, no model
            for backbone embeddings, a codebook larger than the catalogue.
        gti_jax.rec.data.RecDataError: a missing or malformed input file (one line).

    >>> from gti_jax.pipeline import load_config
    >>> cfg = load_config(None, ["rec.embeddings=emb.npy", "rec.codebook_size=16"])
    >>> paths = prepare(cfg, "out/ml100k")  # doctest: +SKIP
    >>> sorted(paths)[:3]  # doctest: +SKIP
    ['aux', 'candidates', 'items']
    """
    rec, seed, model_name = _resolve(cfg, seed)
    bare = isinstance(cfg, RecConfig)
    max_len = _DEFAULT_MAX_LEN if bare else cfg.data.max_len
    out = Path(out_dir).expanduser()
    if rec.embeddings == "backbone" and model is not None and model_name is None:
        model_name = type(model).__name__
    recorded = _recorded_config(rec, seed, model_name, max_len)
    if _check_existing(out, recorded):
        _log(verbose, f"reusing {out} (prepared with the same settings)")
        return _paths(out)
    _check_inputs(rec, model, tokenizer, can_load=not bare)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    raw, ds, split = _load_split(rec)
    imported = None  # read and checked before the embeddings: a bad map fails fast
    if rec.semantic_ids_file:
        ids_file = Path(rec.semantic_ids_file).expanduser()
        imported = sem.import_semantic_ids(ids_file, [it.item_id for it in ds.items])
    times["load"] = time.perf_counter() - t0
    _log(
        verbose,
        f"{ds.name}: {ds.num_users} users, {ds.num_items} items, "
        f"{ds.num_interactions} interactions after filtering",
    )
    t0 = time.perf_counter()
    x = _embeddings(rec, ds, model, tokenizer, model_name, verbose)
    times["embeddings"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sids = imported if imported is not None else _semantic_ids(x, rec, seed)
    times["semantic_ids"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    written = _subsample(split, rec, seed)
    with atomic_dir(out) as tmp:  # replaces an empty `out` (all _check_existing allows)
        paths, new_tokens = _write_files(tmp, rec, ds, written, sids, x, seed, max_len)
        stats = _stats(recorded, rec, (raw, ds, split, written), sids, x, paths, new_tokens)
        text = json.dumps(stats, indent=2, ensure_ascii=False) + "\n"
        (tmp / OUTPUT_FILES["stats"]).write_text(text, encoding="utf-8")
        _relax_permissions(tmp)
    times["write"] = time.perf_counter() - t0
    _log(verbose, "done in " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    return _paths(out)


def _load_split(rec: RecConfig) -> tuple[rd.RecDataset, rd.RecDataset, rd.Split]:
    """The raw dataset, the filtered one and its leave-one-out split (checked non-empty)."""
    raw = _load(rec)
    ds = rd.filter_dataset(
        raw,
        min_user_interactions=rec.min_interactions,
        min_item_interactions=rec.min_interactions,
        max_history=rec.max_sequence_length,
    )
    split = rd.leave_one_out(ds, max_history=rec.max_history)
    if not split.test:
        raise PrepareError(
            f"no user of {raw.name} has >= 3 interactions after filtering "
            f"(min_interactions={rec.min_interactions}); lower rec.min_interactions"
        )
    if rec.codebook_size > ds.num_items and not rec.semantic_ids_file:
        raise PrepareError(
            f"rec.codebook_size={rec.codebook_size} exceeds the {ds.num_items} items left "
            f"after filtering; set rec.codebook_size <= {ds.num_items}"
        )
    return raw, ds, split


def _embeddings(rec, ds, model, tokenizer, model_name, verbose) -> np.ndarray:
    """``[num_items, D]`` item embeddings: the backbone's, or read from rec.embeddings."""
    if rec.embeddings != "backbone":
        try:
            return sem.item_embeddings_from_npy(Path(rec.embeddings).expanduser(), ds.num_items)
        except ValueError as e:
            raise PrepareError(f"rec.embeddings: {e}") from None
    if model is None:
        from gti_jax.models import load_pretrained  # only for backbone embeddings

        _log(verbose, f"loading {model_name}")
        model, tokenizer = load_pretrained(model_name)
    from gti_jax.rec.embed import item_embeddings  # jax-heavy: only for backbone embeddings

    return item_embeddings(
        model,
        tokenizer,
        [rd.item_text(it) for it in ds.items],
        batch_size=rec.embed_batch_size,
        max_len=rec.embed_max_len,
        verbose=verbose,
    )


def _write_files(tmp, rec, ds, written, sids, x, seed, max_len) -> tuple[dict[str, Path], int]:
    """Writes the trainer's files, the semantic IDs and the embeddings into `tmp`; returns
    their paths and the number of new tokens."""
    sizes = list(sids.codebook_sizes)
    paths = prompts.write_task_files(
        tmp,
        ds,
        written,
        sids.codes,
        rng_seed=seed,
        codebook_size=max(sizes),
        history_with_titles=rec.history_with_titles,
        action=_ACTIONS.get(rec.dataset, "interacted with"),
        task=rec.task,
        sequence_items=_sequence_items(rec, max_len, sids.num_levels),
        sequence_overlap=rec.sequence_overlap,
        sequence_prefix=rec.sequence_prefix,
        max_sequence_rows=rec.max_train_examples,
    )
    new_tokens = _keep_tokens(paths["tokens"], sizes)
    sem.save_semantic_ids(tmp / OUTPUT_FILES["semantic_ids"], sids)
    np.save(tmp / OUTPUT_FILES["embeddings"], x, allow_pickle=False)
    return paths, new_tokens


def _stats(recorded, rec, data, sids, x, paths, new_tokens) -> dict[str, Any]:
    """The content of ``prepare_stats.json``; `data` is (raw, filtered, split, written)."""
    raw, ds, split, written = data
    sizes = list(sids.codebook_sizes)
    after = sem.collision_stats(sids.codes, sizes)
    counts = rd.item_popularity(split)
    baseline = {
        "k": list(_KS),
        "counts_from": "training part of every user (valid and test targets excluded)",
        "test": _round(
            metrics.popularity_baseline(counts, [ex.target for ex in written.test], _KS)
        ),
        "valid": _round(
            metrics.popularity_baseline(counts, [ex.target for ex in written.valid], _KS)
        ),
        "test_users": len(written.test),
    }
    sid_stats = sids.stats
    stats = {
        "config": recorded,
        "dataset": {
            "name": ds.name,
            "raw": rd.dataset_stats(raw),
            "filtered": rd.dataset_stats(ds),
            "notes": list(ds.notes),
        },
        "split": {
            "train_examples": len(split.train),
            "valid_examples": len(split.valid),
            "test_examples": len(split.test),
        },
        "examples": {k: _count_lines(paths[k]) for k in ("sft", "valid", "test", "pairs", "aux")},
        "embeddings": {
            "source": rec.embeddings,
            "dim": int(x.shape[1]),
        },
        "semantic_ids": {
            "method": "imported" if rec.semantic_ids_file else rec.semantic_ids,
            "quantizer_levels": rec.levels,
            "levels": sids.num_levels,
            "extra_level": bool(sid_stats.get("extra_level", False)),
            "codebook_sizes": sizes,
            "collision_rate": float(sid_stats["collision_rate"]),
            "max_group": int(sid_stats["max_group"]),
            "codebook_usage": [round(u, 6) for u in after["codebook_usage"]],
            "unique_ids": int(after["num_unique"]),
            "items": sids.num_items,
        },
        "new_tokens": new_tokens,
        "candidates": _count_lines(paths["candidates"]),
        "popularity_baseline": baseline,
        "files": dict(OUTPUT_FILES),
    }
    for key in ("quantization_error", "recon_loss", "codebook_loss", "commitment_loss"):
        if key in sid_stats and isinstance(sid_stats[key], (int, float)):
            stats["semantic_ids"][key] = float(sid_stats[key])
    return stats


def format_summary(stats: dict[str, Any]) -> str:
    """Renders ``prepare_stats.json`` as a few human-readable lines.

    Args:
        stats: the parsed ``prepare_stats.json``.

    Returns:
        Multi-line text: counts, semantic-ID quality, examples per file, popularity baseline.

    >>> s = json.loads(Path("out/prepare_stats.json").read_text())  # doctest: +SKIP
    >>> print(format_summary(s))  # doctest: +SKIP
    """
    d = stats["dataset"]["filtered"]
    s = stats["semantic_ids"]
    e = stats["examples"]
    usage = ", ".join(f"{u:.0%}" for u in s["codebook_usage"])
    pop = stats["popularity_baseline"]
    ks = pop["k"]
    lines = [
        f"dataset {stats['dataset']['name']}: {d['users']} users, {d['items']} items, "
        f"{d['interactions']} interactions (avg length {d['avg_length']:.1f})",
        f"semantic IDs ({s['method']}): {s['quantizer_levels']} x {s['codebook_sizes'][0]} codes"
        + (f" + 1 disambiguation level of {s['codebook_sizes'][-1]}" if s["extra_level"] else "")
        + f"; collision rate before resolution {s['collision_rate']:.2%} "
        f"(largest group {s['max_group']}); codebook usage per level {usage}",
        f"new tokens {stats['new_tokens']}; candidates {stats['candidates']}",
        f"examples: sft {e['sft']}, valid {e['valid']}, test {e['test']}, pairs {e['pairs']}, "
        f"aux {e['aux']}",
        f"popularity baseline on test ({pop['test_users']} users): "
        + ", ".join(
            f"Recall@{k} {pop['test'][f'recall@{k}']:.4f} NDCG@{k} {pop['test'][f'ndcg@{k}']:.4f}"
            for k in ks
        ),
    ]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class PrepareCommand(PrepareConfig):
    """The command line's settings: :class:`~gti_jax.rec.config.PrepareConfig` and ``out``."""

    out: str | None = None
    """Directory the trainer's files are written to (required)."""


_HELP_HEADER = (
    "usage: python -m gti_jax.rec.prepare --out DIR [--config FILE|NAME] [key=value ...]",
    "",
    "Writes the trainer's files for a recommendation dataset into DIR. Keys are also",
    "accepted as --key value or --key=value. The keys below apply (a --config file of a",
    "whole run may hold others, which are ignored).",
)


def _check_command(cfg: PrepareCommand) -> None:
    check_prepare(cfg)
    if not cfg.out:
        raise PrepareError("--out DIR is required; see python -m gti_jax.rec.prepare --help")


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: ``python -m gti_jax.rec.prepare --out DIR [--config FILE] [key=value ...]``.

    Settings are :class:`~gti_jax.rec.config.PrepareConfig`'s (``rec.*``, ``model``,
    ``seed``, ``data.max_len``; a whole run's ``--config`` file works too) and ``out``,
    parsed by :func:`gti_jax.config.parse_cli` like every gti_jax CLI; the summary goes to
    stdout, progress to stderr, a bad input to stderr as one line (exit 2).

    Args:
        argv: arguments after the program name; default ``sys.argv[1:]``.

    Returns:
        The exit status.
    """
    try:
        cfg = engine.parse_cli(
            PrepareCommand,
            sys.argv[1:] if argv is None else argv,
            help=lambda: engine.help_text(PrepareCommand, _HELP_HEADER),
            validate=_check_command,
            file_may_hold_more=True,
        )
        paths = prepare(cfg, cfg.out)
        stats = json.loads(paths["stats"].read_text(encoding="utf-8"))
    except SystemExit as e:  # --help, --print-config
        return int(e.code or 0)
    except (ValueError, OSError) as e:  # PrepareError, RecDataError, ConfigError, missing files
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(stats))
    print(f"wrote {Path(cfg.out)}")
    return 0


def cli() -> None:
    """The ``gti-prepare`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
