"""Record new-token diagnostics during a run, redraw them, and the ``gti_jax.diagnose`` CLI.

The trainer calls :func:`record_stage` after each stage (``init``, ``ground``, ``sft``) with
the embedding table; it writes, under the run directory::

    diagnostics.json                  {stage: geometry.summarize(...) + extras, ...}
    diagnostics/cosine_<stage>.npy    [n_old + n_new, n_old + n_new] float32 cosines
    diagnostics/new_cosine_<stage>.npy [M, M] float32 new-new cosines, semantic-ID order
    spectra.png                       normalized spectra of every recorded stage
    cosine_<stage>.png                50 old + 50 new tokens, a line between the blocks
    new_cosine_<stage>.png            up to 256 new tokens ordered by semantic ID
    loss.png                          (:func:`plot_loss`, from metrics.jsonl)

Each stage dict of ``diagnostics.json`` holds the ``summarize`` keys (``effective_rank``,
``stable_rank``, ``mean_cos``, ``max_cos``, ``singular_values``, ``old_effective_rank``,
``nearest``; ``rsa_pearson`` and ``rsa_spearman`` with code vectors) plus ``rsa_num_new``
(how many new tokens RSA compared; ``rsa_num_tokens`` in older files) and ``plots`` (the
ids behind each saved matrix), so every figure is redrawn from the run directory alone.
Files are written atomically (temporary file, then rename); arrays are plain ``.npy`` (no
pickle) and the JSON never holds NaN (undefined values are ``null``).

Command line::

    python -m gti_jax.diagnose RUN_DIR
    python -m gti_jax.diagnose --export DIR --new-ids START:STOP [--codebook DIR] [--out DIR]
    python -m gti_jax.diagnose --export DIR --tokens tokens.jsonl [--codebook DIR] [--out DIR]

The first prints a summary of ``RUN_DIR/diagnostics.json`` and redraws every PNG; the second
computes fresh diagnostics of an exported Hugging Face checkpoint (input embedding table,
read from safetensors without building the model) into ``--out`` (default: ``diagnose/``
beside the export directory).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gti_jax import config as engine
from gti_jax import geometry, plots
from gti_jax.errors import BadInput
from gti_jax.io.atomic import atomic_write
from gti_jax.rec.codes import LEVEL_LETTERS, parse_code_token

__all__ = [
    "DiagnoseConfig",
    "DiagnoseError",
    "compute_export",
    "format_summary",
    "main",
    "plot_loss",
    "read_diagnostics",
    "record_stage",
    "redraw",
    "token_codebook_vectors",
]

DIAGNOSTICS_FILE = "diagnostics.json"
METRICS_FILE = "metrics.jsonl"
NEW_TOKENS_FILE = "new_tokens.json"
ARRAYS_DIR = "diagnostics"

_OLD_SAMPLE = 50
_NEW_SAMPLE = 50
_NEW_ORDERED = 256
_RSA_SAMPLE = 2000
_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_EMBED_SUFFIX = "embed_tokens.weight"
_WIDTHS = (8, 6, 10, 10, 9, 9, 9, 9)


class DiagnoseError(BadInput):
    """Bad input to the diagnostics recorder or CLI (the message names the problem and fix)."""


# --------------------------------------------------------------------------------------------
# Semantic-ID tokens -> codebook vectors
# --------------------------------------------------------------------------------------------


def token_codebook_vectors(sids: Any, tokens: Sequence[str]) -> np.ndarray | None:
    """Codebook vector of each semantic-ID *token*, for RSA against its learned embedding.

    A token ``<x_c>`` stands for code ``c`` of level ``x`` (``a`` -> level 0, ``b`` -> 1, ...),
    so its vector is row ``c`` of that level's codebook. Decisions:

    * A token with no codebook row (the extra disambiguation level that
      ``resolve_collisions`` adds has no codebook, or a token that is not ``<x_c>``) gets a
      row of NaN; :func:`record_stage` leaves such rows out of RSA, so the quantizer levels
      are still compared.
    * Levels of different widths (not produced by gti_jax's quantizers, which share ``d``)
      are zero-padded on the right to the widest codebook.

    Args:
      sids: a ``gti_jax.rec.semantic_ids.SemanticIds`` (anything with ``codebooks``, a
        sequence of ``[K_l, d_l]`` arrays).
      tokens: ``N`` new tokens, e.g. ``["<a_0>", ..., "<c_255>"]``.

    Returns:
      float32 ``[N, d]`` (NaN rows for tokens without a codebook row), or None when no token
      has one (e.g. the tokens are not semantic-ID tokens).

    Raises:
      DiagnoseError: a code lies outside its level's codebook (wrong codebook directory).

    >>> import numpy as np
    >>> from gti_jax.rec.semantic_ids import SemanticIds
    >>> sids = SemanticIds(np.array([[0, 1], [1, 0]]), (np.eye(2), 2 * np.eye(2)), (2, 2))
    >>> token_codebook_vectors(sids, ["<a_1>", "<b_0>", "<c_0>"]).tolist()
    [[0.0, 1.0], [2.0, 0.0], [nan, nan]]
    """
    books = [np.asarray(b, dtype=np.float32) for b in getattr(sids, "codebooks", ())]
    if not books:
        return None
    width = max(b.shape[1] for b in books)
    out = np.full((len(tokens), width), np.nan, np.float32)
    found = 0
    for i, tok in enumerate(tokens):
        parsed = parse_code_token(str(tok))
        if parsed is None or parsed[0] >= len(books):
            continue
        level, code = parsed
        book = books[level]
        if code >= book.shape[0]:
            raise DiagnoseError(
                f"token {tok!r} has code {code} but level {LEVEL_LETTERS[level]!r} has only "
                f"{book.shape[0]} codes; pass the codebook directory the tokens were made from."
            )
        out[i] = 0.0
        out[i, : book.shape[1]] = book[code]
        found += 1
    return out if found else None


def _semantic_order(tokens: Sequence[str]) -> np.ndarray:
    """Positions sorted by (level, code); tokens that are not ``<x_c>`` go last, in order."""
    keys = []
    for i, tok in enumerate(tokens):
        parsed = parse_code_token(str(tok))
        keys.append((0, *parsed, i) if parsed is not None else (1, 0, 0, i))
    return np.asarray([k[-1] for k in sorted(keys)], np.int64)


# --------------------------------------------------------------------------------------------
# Small file helpers
# --------------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    """Plain JSON types; non-finite floats become None so the file never holds NaN."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()), binary=True)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False), binary=True)


def _load_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiagnoseError(f"{path}: cannot read {what} ({e}); fix or delete the file.") from e


def read_diagnostics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The stage dicts of ``run_dir/diagnostics.json`` (``{}`` when the file is absent)."""
    path = Path(run_dir) / DIAGNOSTICS_FILE
    if not path.exists():
        return {}
    data = _read_json(path, "diagnostics")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DiagnoseError(
            f"{path}: expected {{stage: {{...}}}}; delete it to start the diagnostics afresh."
        )
    return data


def _check_stage(stage: str) -> str:
    if not isinstance(stage, str) or not _STAGE_NAME.fullmatch(stage):
        raise DiagnoseError(
            f"stage name {stage!r} must be letters, digits, '_', '.' or '-' "
            "(it names files), e.g. 'init', 'ground', 'sft'."
        )
    return stage


# --------------------------------------------------------------------------------------------
# Recording one stage
# --------------------------------------------------------------------------------------------


def _new_tokens_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / NEW_TOKENS_FILE
    if not path.is_file():
        return {}
    data = _read_json(path, "new tokens")
    return data if isinstance(data, dict) else {}


def _plot_order(
    new: np.ndarray,
    order: Sequence[int] | Sequence[str] | None,
    tokens: Sequence[str] | None,
) -> np.ndarray:
    """Positions into ``new`` in semantic-ID order (ids or token strings, or parsed tokens)."""
    n = new.size
    if order is not None and len(order) > 0:
        pos_of_id = {int(t): i for i, t in enumerate(new)}
        if all(isinstance(o, str) for o in order):
            if tokens is None:
                raise DiagnoseError("token_order lists tokens but the new tokens are unknown.")
            pos_of_tok = {t: i for i, t in enumerate(tokens)}
            picked = [pos_of_tok.get(o) for o in order]
        else:
            picked = [pos_of_id.get(int(o)) for o in order]
        if any(p is None for p in picked) or len(set(picked)) != len(picked):
            raise DiagnoseError(
                "token_order must list distinct new token ids or tokens; "
                "fix token_order in new_tokens.json."
            )
        rest = sorted(set(range(n)) - set(picked))
        return np.asarray(list(picked) + rest, np.int64)
    if tokens is not None and len(tokens) == n:
        return _semantic_order(tokens)
    return np.arange(n, dtype=np.int64)


def _spread(count: int, limit: int) -> np.ndarray:
    """Evenly spaced positions ``0..count-1``, at most ``limit`` of them, in order."""
    if count <= limit:
        return np.arange(count, dtype=np.int64)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))


def _rsa_part(code: np.ndarray, e_new: np.ndarray) -> dict[str, Any]:
    """RSA over the rows with finite code vectors (evenly spaced subset of at most 2000)."""
    rows = np.flatnonzero(np.all(np.isfinite(code), axis=1))
    out: dict[str, Any] = {"rsa_pearson": None, "rsa_spearman": None}
    rows = rows[_spread(rows.size, _RSA_SAMPLE)]
    out["rsa_num_new"] = int(rows.size)
    if rows.size >= 3:
        r = geometry.rsa(code[rows], e_new[rows])
        out.update({k: (v if math.isfinite(v) else None) for k, v in r.items()})
    return out


def record_stage(
    run_dir: str | os.PathLike,
    stage: str,
    table: Any,
    new_ids: range | Sequence[int] | np.ndarray,
    *,
    codebook_vectors: Any = None,
    decode: Callable[[int], str] | None = None,
    old_ids: Sequence[int] | np.ndarray | None = None,
    tokens: Sequence[str] | None = None,
    token_order: Sequence[int] | Sequence[str] | None = None,
    draw: bool = True,
) -> dict[str, Any]:
    """Computes the diagnostics of one stage and records them (JSON, arrays, PNGs).

    Merges ``geometry.summarize(table, new_ids, ...)`` into ``run_dir/diagnostics.json``
    under ``stage`` (other stages are kept; the write is atomic), saves the cosine matrices
    the figures need under ``run_dir/diagnostics/`` and redraws ``spectra.png`` (all
    stages), ``cosine_<stage>.png`` and ``new_cosine_<stage>.png``. Call it from one process
    (process 0 on multi-host runs); ``table`` is pulled to the host.

    The old-vs-new matrix uses 50 old rows spread evenly over ``old_ids`` and the first 50
    new ids; the new-new matrix up to 256 new tokens (evenly spaced) in semantic-ID order.
    That order is ``token_order``, else ``token_order`` or the parsed ``tokens`` of
    ``run_dir/new_tokens.json``, else the parsed ``tokens`` argument or ``decode(id)``
    (``<a_3>`` before ``<a_10>`` before ``<b_0>``), else id order.

    Args:
      run_dir: the run directory (created if missing).
      stage: stage name (``"init"``, ``"ground"``, ``"sft"``, ...); it names files.
      table: embedding table ``[V, D]`` (numpy or jax; padding rows allowed).
      new_ids: ids of the new tokens ``[N]``, ``N >= 2``.
      codebook_vectors: optional ``[N, C]`` code vectors aligned with ``new_ids`` (e.g. from
        :func:`token_codebook_vectors`); adds RSA. NaN rows are left out of RSA.
      decode: optional ``id -> text`` to label nearest old tokens (and new tokens).
      old_ids: ids that count as old; default ``range(min(new_ids))``, the tokenizer's
        original tokens (padding rows past the new ids stay out of samples and neighbours).
      tokens: optional new token strings aligned with ``new_ids`` (for the order).
      token_order: optional semantic-ID order, as new token ids or token strings.
      draw: redraw the PNGs (False records the numbers and arrays only).

    Returns:
      The stage dict as written to ``diagnostics.json``.

    >>> import numpy as np, tempfile
    >>> table = np.random.default_rng(0).normal(size=(20, 8))
    >>> out = record_stage(tempfile.mkdtemp(), "ground", table, range(12, 20), draw=False)
    >>> out["num_new"], out["effective_rank"] > 4
    (8, True)
    """
    run = Path(run_dir)
    _check_stage(stage)
    t, new, old, code = _check_stage_inputs(table, new_ids, old_ids, codebook_vectors)
    tokens, order = _tokens_and_order(run, new, tokens, token_order, decode)

    out = geometry.summarize(
        t,
        new,
        old_sample=_OLD_SAMPLE,
        decode=decode,
        rsa_sample=_RSA_SAMPLE,
        old_ids=old,
    )
    e_new = t[new].astype(np.float64)
    if code is not None:
        out.update(_rsa_part(code, e_new))
    if decode is not None:
        for item in out["nearest"]:
            item["text"] = str(decode(item["id"]))
    out["plots"] = _save_plot_arrays(run, stage, t, old, new, order, tokens)
    out = _jsonable(out)

    data = read_diagnostics(run)
    data[stage] = out
    _write_json(run / DIAGNOSTICS_FILE, data)
    if draw:
        _draw_spectra(run, data)
        _draw_stage(run, stage, out)
    return out


def _check_stage_inputs(
    table: Any,
    new_ids: range | Sequence[int] | np.ndarray,
    old_ids: Sequence[int] | np.ndarray | None,
    codebook_vectors: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`record_stage`'s arrays, checked: the table, new ids, old ids, code vectors."""
    t = np.asarray(table)
    if t.ndim != 2:
        raise DiagnoseError(f"table must be a 2-D [V, D] matrix, got shape {t.shape}.")
    new = np.asarray(list(new_ids) if isinstance(new_ids, range) else new_ids)
    if new.ndim != 1 or new.size < 2 or not np.issubdtype(new.dtype, np.integer):
        raise DiagnoseError("new_ids must be a 1-D sequence of at least 2 integer token ids.")
    new = new.astype(np.int64)
    if new.min() < 0 or new.max() >= t.shape[0]:
        raise DiagnoseError(f"new_ids must lie in [0, {t.shape[0]}) (the table's rows).")
    if old_ids is None:
        old = np.arange(int(new.min()), dtype=np.int64)
    else:
        old = np.asarray(old_ids, dtype=np.int64).reshape(-1)
    code = None
    if codebook_vectors is not None:
        code = np.asarray(codebook_vectors, dtype=np.float64)
        if code.ndim != 2 or code.shape[0] != new.size:
            raise DiagnoseError(
                f"codebook_vectors must be [N={new.size}, C] aligned with new_ids, got shape "
                f"{code.shape}; use token_codebook_vectors(sids, tokens)."
            )
    return t, new, old, code


def _tokens_and_order(
    run: Path,
    new: np.ndarray,
    tokens: Sequence[str] | None,
    token_order: Sequence[int] | Sequence[str] | None,
    decode: Callable[[int], str] | None,
) -> tuple[list[str] | None, np.ndarray]:
    """The new tokens' strings (or None) and their semantic-ID plot order (see record_stage)."""
    info = _new_tokens_info(run)
    if tokens is None and isinstance(info.get("tokens"), list) and len(info["tokens"]) == new.size:
        tokens = [str(x) for x in info["tokens"]]
    if tokens is None and decode is not None:
        tokens = [str(decode(int(i))) for i in new]
    if tokens is not None and len(tokens) != new.size:
        raise DiagnoseError(f"tokens has {len(tokens)} entries for {new.size} new ids.")
    if token_order is None and isinstance(info.get("token_order"), list):
        token_order = info["token_order"]
    return tokens, _plot_order(new, token_order, tokens)


def _save_plot_arrays(
    run: Path,
    stage: str,
    t: np.ndarray,
    old: np.ndarray,
    new: np.ndarray,
    order: np.ndarray,
    tokens: Sequence[str] | None,
) -> dict[str, Any]:
    """Saves the cosine matrices the figures need; returns the stage's ``plots`` entry.

    The old sample plus the first new ids, and the new-new matrix in semantic-ID order.
    """
    old_pick = old[_spread(old.size, _OLD_SAMPLE)]
    new_pick = new[:_NEW_SAMPLE]
    mixed = geometry.cosine_matrix(t[np.concatenate([old_pick, new_pick])])
    shown = order[_spread(new.size, _NEW_ORDERED)]
    ordered = new[shown]
    new_cos = geometry.cosine_matrix(t[ordered])
    arrays = run / ARRAYS_DIR
    _save_npy(arrays / f"cosine_{stage}.npy", mixed.astype(np.float32))
    _save_npy(arrays / f"new_cosine_{stage}.npy", new_cos.astype(np.float32))
    return {
        "cosine": {
            "file": f"{ARRAYS_DIR}/cosine_{stage}.npy",
            "old_ids": old_pick,
            "new_ids": new_pick,
            "split": int(old_pick.size),
        },
        "new_cosine": {
            "file": f"{ARRAYS_DIR}/new_cosine_{stage}.npy",
            "ids": ordered,
            "labels": None if tokens is None else [tokens[p] for p in shown],
        },
    }


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _draw_spectra(run: Path, data: dict[str, Any]) -> Path | None:
    spectra = {}
    for stage, d in data.items():
        s = np.asarray(d.get("singular_values") or [], dtype=np.float64)
        if s.size and np.all(np.isfinite(s)) and s.max() > 0:
            spectra[stage] = s
    if not spectra:
        return None
    return plots.plot_spectra(spectra, run / "spectra.png")


def _draw_stage(run: Path, stage: str, d: dict[str, Any]) -> list[Path]:
    """Draws the cosine figures of one stage from its saved arrays (missing ones skipped)."""
    written = []
    spec = d.get("plots") or {}
    cos = spec.get("cosine")
    if cos and (run / cos["file"]).is_file():
        m = _load_npy(run / cos["file"])
        split = int(cos.get("split") or 0)
        written.append(
            plots.plot_cosine_heatmap(
                m,
                run / f"cosine_{stage}.png",
                split=split if 0 < split < m.shape[0] else None,
                title=f"Cosine: {split} old | {m.shape[0] - split} new tokens ({stage})",
            )
        )
    new_cos = spec.get("new_cosine")
    if new_cos and (run / new_cos["file"]).is_file():
        m = _load_npy(run / new_cos["file"])
        labels = new_cos.get("labels")
        written.append(
            plots.plot_cosine_heatmap(
                m,
                run / f"new_cosine_{stage}.png",
                labels=labels if labels and len(labels) == m.shape[0] else None,
                title=f"Cosine: new tokens by semantic ID ({stage})",
            )
        )
    return written


def _read_metrics(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    curves: dict[str, tuple[list[float], list[float]]] = {}
    lines = path.read_text().split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            stage, step, loss = str(rec["stage"]), float(rec["step"]), float(rec["loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if lineno == len(lines):  # a last line cut off mid-write (no newline yet)
                continue
            raise DiagnoseError(
                f"{path}:{lineno}: expected {{'stage', 'step', 'loss', ...}} ({e}); "
                "fix or delete the line."
            ) from e
        steps, losses = curves.setdefault(stage, ([], []))
        steps.append(step)
        losses.append(loss)
    return curves


def plot_loss(run_dir: str | os.PathLike) -> Path:
    """Draws ``run_dir/loss.png`` from ``run_dir/metrics.jsonl``, one curve per stage.

    Args:
      run_dir: the run directory.

    Returns:
      The PNG path.

    Raises:
      FileNotFoundError: no ``metrics.jsonl``.
      DiagnoseError: a malformed line (a cut-off last line is skipped) or no records.

    >>> import json, pathlib, tempfile
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (run / "metrics.jsonl").write_text(
    ...     json.dumps({"stage": "ground", "step": 0, "loss": 2.0}) + "\\n")
    >>> plot_loss(run).name
    'loss.png'
    """
    run = Path(run_dir)
    path = run / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the trainer writes it while training.")
    curves = _read_metrics(path)
    if not curves:
        raise DiagnoseError(f"{path} holds no records; train first.")
    return plots.plot_loss_curves(curves, run / "loss.png", title="Training loss by stage")


def redraw(run_dir: str | os.PathLike) -> list[Path]:
    """Redraws every PNG of a run directory from its saved numbers and arrays.

    Args:
      run_dir: a directory with ``diagnostics.json`` (and optionally ``metrics.jsonl``).

    Returns:
      The PNG paths written.

    >>> import numpy as np, tempfile
    >>> run = tempfile.mkdtemp()
    >>> _ = record_stage(run, "init", np.eye(6), [4, 5], draw=False)
    >>> sorted(p.name for p in redraw(run))
    ['cosine_init.png', 'new_cosine_init.png', 'spectra.png']
    """
    run = Path(run_dir)
    data = read_diagnostics(run)
    written = []
    spectra = _draw_spectra(run, data)
    if spectra is not None:
        written.append(spectra)
    for stage, d in data.items():
        _check_stage(stage)
        written.extend(_draw_stage(run, stage, d))
    if (run / METRICS_FILE).is_file():
        written.append(plot_loss(run))
    return written


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, int | float):
        return f"{x:.{digits}f}"
    return str(x)


def _short(text: Any, width: int = 16) -> str:
    s = repr(str(text))[1:-1]
    return s if len(s) <= width else s[: width - 1] + "~"


def format_summary(data: dict[str, Any], *, examples: int = 3, neighbors: int = 3) -> str:
    """A readable table of the stage dicts of ``diagnostics.json`` plus nearest-token examples.

    Args:
      data: ``{stage: stage dict}`` as in ``diagnostics.json``.
      examples: new tokens shown per stage with their nearest old tokens.
      neighbors: neighbours shown per new token.

    Returns:
      The text (several lines, no trailing newline).

    >>> format_summary({"init": {"num_new": 2, "effective_rank": 1.0}}).splitlines()[2].split()
    ['init', '2', '1.000', '-', '-', '-', '-', '-']
    """
    cols = ("stage", "N", "eff_rank", "stab_rank", "mean_cos", "max_cos", "rsa_r", "rsa_rho")

    def row(cells: Sequence[str]) -> str:
        first, *rest = cells
        return first.ljust(_WIDTHS[0]) + "".join(
            c.rjust(w) for c, w in zip(rest, _WIDTHS[1:], strict=True)
        )

    head = row(cols)
    lines = [head, "-" * len(head)]
    for stage, d in data.items():
        vals = (
            str(stage),
            str(d.get("num_new", "-")),
            _fmt(d.get("effective_rank")),
            _fmt(d.get("stable_rank")),
            _fmt(d.get("mean_cos")),
            _fmt(d.get("max_cos")),
            _fmt(d.get("rsa_pearson")),
            _fmt(d.get("rsa_spearman")),
        )
        lines.append(row(vals))
    for stage, d in data.items():
        nearest = d.get("nearest") or []
        if not nearest or examples <= 0:
            continue
        lines.append(f"nearest old tokens ({stage}):")
        for item in nearest[:examples]:
            name = _short(item.get("text", f"#{item.get('id')}"))
            nbrs = ", ".join(
                f"{_short(n.get('text', '#' + str(n.get('id'))))} ({_fmt(n.get('cos'), 2)})"
                for n in (item.get("neighbors") or [])[:neighbors]
            )
            lines.append(f"  {name} [{item.get('id')}] -> {nbrs}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Diagnostics of an exported checkpoint
# --------------------------------------------------------------------------------------------


def _parse_new_ids(spec: str) -> range:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec or "")
    if m is None:
        raise DiagnoseError(f"--new-ids {spec!r} must be START:STOP, e.g. --new-ids 49152:49920.")
    start, stop = int(m.group(1)), int(m.group(2))
    if stop - start < 2:
        raise DiagnoseError(f"--new-ids {spec!r} must span at least 2 ids (START < STOP - 1).")
    return range(start, stop)


def _embedding_table(tensors: dict[str, np.ndarray], where: Path) -> np.ndarray:
    names = sorted(n for n in tensors if n.endswith(_EMBED_SUFFIX))
    if not names:
        raise DiagnoseError(
            f"{where}: no '*{_EMBED_SUFFIX}' tensor; pass a Hugging Face Llama/Qwen checkpoint."
        )
    table = tensors[names[0]]
    if table.ndim != 2:
        raise DiagnoseError(f"{where}: {names[0]} has shape {table.shape}, expected [V, D].")
    return table


def _load_tokenizer(export_dir: Path) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(export_dir))
    except Exception:  # transformers raises many types for a missing or broken tokenizer
        return None


def compute_export(
    export_dir: str | os.PathLike,
    *,
    new_ids: str | range | Sequence[int] | None = None,
    tokens_file: str | os.PathLike | None = None,
    codebook_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    stage: str = "export",
) -> tuple[Path, dict[str, Any]]:
    """Fresh diagnostics of the input embeddings of an exported Hugging Face checkpoint.

    Reads the safetensors table (memory-mapped; the model is never built), finds the new ids
    from ``new_ids`` or from ``tokens_file`` through the exported tokenizer, and records them
    with :func:`record_stage` into ``out_dir``.

    Args:
      export_dir: checkpoint directory (``config.json``, safetensors, tokenizer files).
      new_ids: ``"START:STOP"`` or ids; exclusive with ``tokens_file``.
      tokens_file: a tokens ``.jsonl``/``.txt`` file; its tokens are looked up in the
        exported tokenizer.
      codebook_dir: a semantic-IDs directory (``save_semantic_ids``) for RSA.
      out_dir: output run directory; default ``export_dir/../diagnose``.
      stage: the stage name in ``diagnostics.json``.

    Returns:
      ``(out_dir, stage dict)``.

    >>> compute_export("/no/such/dir", new_ids="1:3")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    FileNotFoundError: /no/such/dir: export directory not found; ...
    """
    from gti_jax.io.safetensors import load_dir_tensors

    export = Path(export_dir)
    _check_stage(stage)
    if not export.is_dir():
        raise FileNotFoundError(f"{export}: export directory not found; pass a checkpoint dir.")
    if (new_ids is None) == (tokens_file is None):
        raise DiagnoseError("pass exactly one of --new-ids START:STOP or --tokens FILE.")
    ids: Sequence[int] | None = None
    if new_ids is not None:
        ids = _parse_new_ids(new_ids) if isinstance(new_ids, str) else new_ids
    if codebook_dir is not None and not Path(codebook_dir).is_dir():
        raise FileNotFoundError(f"{codebook_dir}: codebook directory not found.")
    table = _embedding_table(load_dir_tensors(export), export)
    tokenizer = _load_tokenizer(export)
    names: list[str] | None = None
    if tokens_file is not None:
        from gti_jax.vocab.tokens import read_tokens_file

        names = [e.token for e in read_tokens_file(tokens_file)]
        if tokenizer is None:
            raise DiagnoseError(
                f"{export}: no loadable tokenizer to look up --tokens; use --new-ids."
            )
        vocab = tokenizer.get_vocab()
        missing = [t for t in names if t not in vocab]
        if missing:
            raise DiagnoseError(
                f"{len(missing)} tokens of {tokens_file} are not in the exported tokenizer "
                f"(e.g. {missing[0]!r}); pass the tokens file used to extend it."
            )
        ids = [int(vocab[t]) for t in names]
    assert ids is not None
    if len(ids) < 2 or max(ids) >= table.shape[0]:
        raise DiagnoseError(
            f"new ids must be at least 2 ids in [0, {table.shape[0]}) (the table's rows)."
        )
    decode = None
    if tokenizer is not None:
        decode = lambda i: tokenizer.decode([int(i)])  # noqa: E731
        if names is None:
            names = [str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]
    code = None
    if codebook_dir is not None:
        from gti_jax.rec.semantic_ids import load_semantic_ids

        if names is None:
            raise DiagnoseError(f"{export}: no tokenizer to name the new ids for --codebook.")
        code = token_codebook_vectors(load_semantic_ids(codebook_dir), names)
        if code is None:
            raise DiagnoseError(
                "--codebook given but no new token is a semantic-ID token like '<a_12>'; "
                "drop --codebook or pass the right ids."
            )
    out = Path(out_dir) if out_dir is not None else export.resolve().parent / "diagnose"
    result = record_stage(
        out, stage, table, ids, codebook_vectors=code, decode=decode, tokens=names
    )
    return out, result


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiagnoseConfig:
    """The settings of ``python -m gti_jax.diagnose`` (``gti-diagnose``)."""

    run_dir: str | None = None
    """Run directory with diagnostics.json (the bare argument RUN_DIR)."""

    export: str | None = None
    """Exported Hugging Face checkpoint directory to diagnose instead."""

    new_ids: str | None = None
    """New token ids START:STOP (with --export)."""

    tokens: str | None = None
    """Tokens .jsonl/.txt that find the new ids (with --export)."""

    codebook: str | None = None
    """Semantic-IDs directory; adds RSA (with --export)."""

    out: str | None = None
    """Output directory (with --export; default: diagnose/ beside the export)."""

    stage: str = "export"
    """Stage name of the --export results."""


_HELP_HEADER = (
    "usage: python -m gti_jax.diagnose RUN_DIR",
    "       python -m gti_jax.diagnose --export DIR (--new-ids START:STOP | --tokens FILE)",
    "           [--codebook DIR] [--out DIR] [--stage NAME]",
    "",
    "Summarizes and redraws a run's new-token diagnostics, or diagnoses an exported Hugging",
    "Face checkpoint. Every key is also accepted as key=value or --key=value.",
)


def parse_cli(argv: Sequence[str]) -> DiagnoseConfig:
    """The command line (:func:`gti_jax.config.parse_cli`'s style) -> :class:`DiagnoseConfig`.

    Example:
      >>> parse_cli(["--export", "x", "--new-ids", "10:20"]).new_ids
      '10:20'
    """
    return engine.parse_cli(
        DiagnoseConfig,
        argv,
        help=lambda: engine.help_text(DiagnoseConfig, _HELP_HEADER),
        positional=("run_dir",),
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_cli(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help, --print-config
        return int(e.code or 0)
    except BadInput as e:  # ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.export is None:
            if args.run_dir is None:
                raise DiagnoseError("pass RUN_DIR, or --export DIR with --new-ids or --tokens.")
            if args.new_ids or args.tokens or args.codebook or args.out:
                raise DiagnoseError("--new-ids/--tokens/--codebook/--out go with --export DIR.")
            run = Path(args.run_dir)
            if not run.is_dir():
                raise FileNotFoundError(f"{run}: run directory not found; check the path.")
            if not (run / DIAGNOSTICS_FILE).is_file():
                raise FileNotFoundError(
                    f"{run / DIAGNOSTICS_FILE} not found; record stages with record_stage first."
                )
            data = read_diagnostics(run)
            written = redraw(run)
        else:
            if args.run_dir is not None:
                raise DiagnoseError("pass either RUN_DIR or --export DIR, not both.")
            run, _ = compute_export(
                args.export,
                new_ids=args.new_ids,
                tokens_file=args.tokens,
                codebook_dir=args.codebook,
                out_dir=args.out,
                stage=args.stage,
            )
            data = read_diagnostics(run)
            written = sorted(run.glob("*.png"))
    except (ValueError, FileNotFoundError) as e:  # DiagnoseError, loader errors
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(format_summary(data))
    print(f"wrote {run / DIAGNOSTICS_FILE} and {len(written)} figures in {run}")
    return 0


def cli() -> None:
    """The ``gti-diagnose`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
