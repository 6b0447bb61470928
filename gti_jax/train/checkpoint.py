"""Checkpoints of a training run (orbax).

:class:`Checkpointer` wraps an orbax ``CheckpointManager``. A checkpoint at global step ``s``
holds two items: ``state`` (any pytree of jax arrays: parameters, optimizer state, ...) and
``meta`` (a JSON mapping: stage, data position, random key data, ...). Steps are global: they
keep counting across stages (grounding, then fine-tuning), so one directory orders every
checkpoint of a run.

Checkpoints are written atomically: orbax writes ``<step>.orbax-checkpoint-tmp...`` and
renames it to ``<step>`` only when every item is on disk (on buckets it writes a commit
marker instead). Only complete checkpoints are listed or restored; temporary directories
left by an interrupted save are ignored and removed when a :class:`Checkpointer` opens the
directory.

Every checkpoint is sealed by a checksum manifest (``gti_checksums.json`` in the step
directory: the size and SHA-256 of every file orbax wrote), written atomically once orbax has
finished the save (after the next save starts, on :meth:`Checkpointer.wait`,
:meth:`Checkpointer.seal_finished` or :meth:`Checkpointer.close`). :meth:`Checkpointer.verify`
checks one step (manifest present, every file with its size and hash, orbax restores its
meta and reads its state's metadata); :meth:`Checkpointer.newest_verified` is where a run
resumes: the newest step that verifies. Newer steps that do not verify (a truncated or
bit-flipped array file, a missing metadata file, a save killed before it was sealed) are
reported and moved aside to ``<step>.unverified`` so that the resumed run can write its own.

Restoring takes a target pytree whose leaves carry shardings, and places every array
directly onto them, so a checkpoint written on one mesh restores onto another (e.g. saved
on 4x2 devices, restored on 8x1) without gathering a full array on one device.

The grounded-rows artifact (the new rows alone, a file format of its own) is
:mod:`gti_jax.io.rows`; its names are re-exported here for the trainer. Nothing here pickles.

Example:
  >>> import tempfile, jax.numpy as jnp
  >>> ckpt = Checkpointer(tempfile.mkdtemp(), keep=2, async_save=False)
  >>> ckpt.save(10, {"w": jnp.ones((2, 3))}, {"stage": "ground"})
  True
  >>> state, meta = ckpt.restore(target={"w": jnp.zeros((2, 3))})
  >>> float(state["w"].sum()), meta["stage"]
  (6.0, 'ground')
  >>> ckpt.close()
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from gti_jax.errors import BadInput, CheckpointError
from gti_jax.io.rows import (
    HEAD_ROWS_FILE,
    ROWS_FILE,
    RowsFileNotFoundError,
    checked_rows,
    load_rows,
    save_rows,
)

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "NoVerifiedCheckpointError",
    "RowsFileNotFoundError",
    "HEAD_ROWS_FILE",
    "ROWS_FILE",
    "checked_rows",
    "load_rows",
    "save_rows",
]


_STATE = "state"
_META = "meta"
# Written by orbax into every checkpoint before it is finalized; a step directory without it
# (made by hand, or by another tool) is not taken as a checkpoint.
_COMPLETE_MARKER = "_CHECKPOINT_METADATA"
# The checksum manifest that seals a finished save; a step without it is not resumed from.
_CHECKSUMS = "gti_checksums.json"
_CHECKSUMS_FORMAT = "gti_jax.checkpoint-checksums/1"
_SET_ASIDE_SUFFIX = ".unverified"


class NoVerifiedCheckpointError(CheckpointError, BadInput):
    """Checkpoints exist but none verifies (one line naming the checkpoint directory).

    Bad input: the run cannot resume from what it was given, and nothing is written."""


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path_str(path: tuple[Any, ...]) -> str:
    """A pytree path as 'a/b/0/value', the same for the target and orbax's metadata tree."""
    return "/".join(_key_name(e) for e in path) or "<root>"


def _abstract_leaf(path: tuple[Any, ...], leaf: Any) -> jax.ShapeDtypeStruct:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        if leaf.sharding is None:
            raise CheckpointError(
                f"restore target leaf {_path_str(path)} has no sharding; build it as "
                "jax.ShapeDtypeStruct(shape, dtype, sharding=...)"
            )
        return leaf
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    raise CheckpointError(
        f"restore target leaf {_path_str(path)} is a {type(leaf).__name__}; give a jax.Array "
        "or a jax.ShapeDtypeStruct with a sharding"
    )


def _sha256(path: epath.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files_under(root: epath.Path) -> list[epath.Path]:
    """Every regular file below `root` (recursively), sorted, except the manifest itself."""
    if _is_local(root):
        found = [epath.Path(d) / n for d, _, names in os.walk(os.fspath(root)) for n in names]
    else:  # a bucket
        found = [p for p in root.glob("**/*") if p.is_file()]
    manifest = os.fspath(root / _CHECKSUMS)
    return sorted((p for p in found if os.fspath(p) != manifest), key=os.fspath)


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def _checksums(step_dir: epath.Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` for every file of a step."""
    root = os.fspath(step_dir)
    return {
        os.path.relpath(os.fspath(p), root): {"size": p.stat().length, "sha256": _sha256(p)}
        for p in _files_under(step_dir)
    }


def _local_or_remote(directory: str | os.PathLike[str]) -> epath.Path:
    text = os.fspath(directory)
    if not text:
        raise CheckpointError("checkpoint directory must be a non-empty path")
    return epath.Path(text if "://" in text else os.path.abspath(text))


class Checkpointer:
    """Saves and restores training state at global steps, keeping the newest `keep`.

    Args:
      directory: where checkpoints live (local path or a bucket URL such as ``gs://b/run``);
        created if missing. Every process of a multi-host run passes the same directory.
      keep: how many complete checkpoints to keep; older ones are deleted after a save.
      async_save: write in a background thread. ``save`` returns once the arrays are
        copied off the devices, so the caller may update (or donate) them right away;
        call :meth:`wait` before reading the checkpoint back from another process.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> with Checkpointer(tempfile.mkdtemp(), keep=1) as ckpt:
      ...     ckpt.save(1, {"w": jnp.zeros(2)}, {"stage": "sft"})
      ...     ckpt.wait()
      ...     ckpt.latest_step()
      True
      1
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, keep: int = 3, async_save: bool = True
    ) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise CheckpointError(f"keep must be an int >= 1, got {keep!r}")
        self._dir = _local_or_remote(directory)
        self._unsealed: list[int] = []  # saved by this process, not yet sealed
        self._seal_lock = threading.Lock()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=bool(async_save),
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self._dir,
            options=options,
            item_handlers={
                _STATE: ocp.StandardCheckpointHandler(),
                _META: ocp.JsonCheckpointHandler(),
            },
        )
        # orbax removes interrupted saves' temporary directories in a background thread and
        # waits for it only before its next save: wait here, so that a directory opened to
        # resume or restore is clean when the constructor returns (and the removal is not
        # cut short by a process that only reads and exits). A later orbax without this
        # hook leaves the removal to orbax (tests/unit/test_checkpoint.py notices).
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    @property
    def directory(self) -> str:
        """The absolute checkpoint directory."""
        return os.fspath(self._dir)

    def _is_complete(self, step: int) -> bool:
        return (self._dir / str(step) / _COMPLETE_MARKER).exists()

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints on disk, ascending.

        A save still in flight in this process is not listed until it is finalized
        (see :meth:`wait`).
        """
        return sorted(s for s in self._manager.all_steps() if self._is_complete(s))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(
        self,
        step: int,
        state: Any,
        meta: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Saves `state` and `meta` as the checkpoint of global step `step`.

        Args:
          step: the global step (counting across stages), >= 0. Steps must increase: a step
            at or below one already saved is skipped.
          state: a pytree of jax arrays (sharded or not), e.g. params and optimizer state.
          meta: a JSON-serializable mapping (stage name, data position, seed, random key data
            as a list of ints, ...).
          force: save even where orbax's save policy would skip this step.

        Returns:
          True if a checkpoint was written (or, with async saving, started); False if it was
          skipped because `step` is not newer than the last saved step.

        Raises:
          CheckpointError: a bad step or a `meta` that is not a JSON mapping (checked before
            anything is written).
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise CheckpointError(f"step must be an int >= 0, got {step!r}")
        step = int(step)
        meta = {} if meta is None else meta
        if not isinstance(meta, Mapping):
            raise CheckpointError(f"meta must be a mapping, got {type(meta).__name__}")
        try:
            meta = json.loads(json.dumps(dict(meta), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"meta must be JSON-serializable (convert arrays with .tolist()): {e}"
            ) from None
        known = self._manager.all_steps()  # includes a save still in flight
        if known and step <= max(known):
            return False
        self.wait()  # orbax waits for the previous save anyway; seal it first
        saved = bool(
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
                ),
                force=force,
            )
        )
        if saved:
            self._unsealed.append(step)
            if not self._manager.is_saving_in_progress():  # a synchronous save: seal it now
                self._seal()
        return saved

    def _seal(self) -> None:
        """Writes the checksum manifest of every finished save of this process not yet sealed.

        Process 0 writes (the directory is shared); a step orbax already deleted (``keep``)
        is dropped. The manifest is written to a temporary name and renamed into place.
        """
        with self._seal_lock:
            pending, self._unsealed = self._unsealed, []
            if jax.process_index() != 0:
                return
            for step in pending:
                if self._is_complete(step):
                    self._write_manifest(step)

    def _write_manifest(self, step: int) -> None:
        """Seals one finished save: its checksum manifest, written to a temporary name and
        renamed into place (a step orbax's garbage collection removed meanwhile is skipped)."""
        step_dir = self._dir / str(step)
        try:
            files = _checksums(step_dir)
        except FileNotFoundError:
            return
        body = {"format": _CHECKSUMS_FORMAT, "step": step, "files": files}
        tmp = step_dir / f".{_CHECKSUMS}.tmp"
        tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
        tmp.rename(step_dir / _CHECKSUMS)

    def seal_finished(self) -> None:
        """Seals the saves that have finished, without waiting for one still in flight."""
        if self._unsealed and not self._manager.is_saving_in_progress():
            self._seal()

    def verify(self, step: int) -> str | None:
        """Why checkpoint `step` cannot be trusted, or None when it verifies.

        It verifies when orbax finalized it, every file its checksum manifest lists has the
        recorded size and SHA-256 (a save without a manifest is checked by orbax alone), orbax restores its meta and reads
        its state's metadata (tree, shapes, dtypes). The arrays are restored, onto the
        caller's shardings, by :meth:`restore`.
        """
        step_dir = self._dir / str(step)
        if not self._is_complete(step):
            return f"orbax's {_COMPLETE_MARKER} file is missing (an unfinished save)"
        try:
            manifest = json.loads((step_dir / _CHECKSUMS).read_text())
        except FileNotFoundError:
            # Finalized by orbax (an atomic rename) but never sealed: written by a gti_jax
            # from before checksum manifests, or stopped between orbax's commit and the seal.
            # Its files are complete; only orbax's own checks below apply to it.
            manifest = {"format": _CHECKSUMS_FORMAT, "files": {}}
        except (OSError, ValueError) as e:
            return f"unreadable checksum manifest {_CHECKSUMS}: {e}"
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if manifest.get("format") != _CHECKSUMS_FORMAT or not isinstance(files, dict):
            return f"checksum manifest {_CHECKSUMS} is not in format {_CHECKSUMS_FORMAT}"
        for rel, want in sorted(files.items()):
            path = step_dir / rel
            try:
                size = path.stat().length
                if size != want["size"]:
                    return f"{rel} has {size} bytes, {want['size']} were saved"
                if _sha256(path) != want["sha256"]:
                    return f"{rel} does not match its saved SHA-256"
            except FileNotFoundError:
                return f"{rel} is missing"
        try:
            self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
            self._manager.item_metadata(step)[_STATE]
        except Exception as e:  # noqa: BLE001 (any orbax failure means: do not resume here)
            return f"orbax cannot read it: {' '.join(str(e).split())[:200]}"
        return None

    def newest_verified(self) -> tuple[int | None, list[tuple[int, str]]]:
        """The newest checkpoint that verifies, and the newer ones that do not.

        Candidates are the step directories orbax finalized or a manifest sealed (a
        directory with neither, e.g. made by hand, is not a checkpoint). Every candidate
        newer than the one returned is reported with the reason, newest first, and moved
        aside to ``<step>.unverified`` (so the resumed run can save those steps again;
        nothing is deleted). A save orbax finalized but that was never sealed (an older
        gti_jax, or stopped between orbax's commit and the seal) is complete: it verifies by
        orbax's checks alone and is sealed when it is the one returned.

        Returns:
          ``(step, skipped)``: step is None when no checkpoint verifies and none is damaged.

        Example:
          >>> import tempfile, jax.numpy as jnp
          >>> with Checkpointer(tempfile.mkdtemp(), async_save=False) as ckpt:
          ...     ckpt.save(1, {"w": jnp.zeros(2)}, {"stage": "sft"})
          ...     ckpt.newest_verified()
          True
          (1, [])

        Raises:
          NoVerifiedCheckpointError: some checkpoint is damaged and none verifies (nothing
            is moved).
        """
        self.wait()
        steps = sorted(
            (
                int(p.name)
                for p in self._dir.iterdir()
                if p.name.isdigit()
                and ((p / _COMPLETE_MARKER).exists() or (p / _CHECKSUMS).exists())
            ),
            reverse=True,
        )
        found, skipped = None, []
        for step in steps:
            why = self.verify(step)
            if why is None:
                found = step
                break
            skipped.append((step, why))
        damaged = [(s, w) for s, w in skipped if (self._dir / str(s) / _CHECKSUMS).exists()]
        if found is None and damaged:
            reasons = "; ".join(f"step {s}: {w}" for s, w in damaged[:3])
            raise NoVerifiedCheckpointError(
                f"no checkpoint in {self.directory} verifies ({reasons}); move the "
                "directory away to start over, or restore it from a copy"
            )
        if found is not None and not (self._dir / str(found) / _CHECKSUMS).exists():
            if jax.process_index() == 0:
                print(
                    f"gti_jax.checkpoint: step {found} has no checksum manifest (written before "
                    "checkpoints were sealed, or stopped before sealing); orbax finalized it, "
                    "so it is resumed from and sealed now",
                    file=sys.stderr,
                )
                self._write_manifest(found)
        if skipped:
            if jax.process_index() == 0:
                for bad, _ in skipped:
                    self._set_aside(bad)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("gti_jax.checkpoint: set aside")
            self._manager.reload()
        return found, skipped

    def _set_aside(self, step: int) -> None:
        target = self._dir / f"{step}{_SET_ASIDE_SUFFIX}"
        n = 1
        while target.exists():
            n += 1
            target = self._dir / f"{step}{_SET_ASIDE_SUFFIX}-{n}"
        (self._dir / str(step)).rename(target)

    def _check_target(self, step: int, abstract: Any) -> None:
        """Raises one line listing every path or shape where `abstract` and the checkpoint
        differ."""
        try:
            saved = self._manager.item_metadata(step)[_STATE]
        except Exception:  # metadata unreadable: orbax's own restore error will tell
            return
        saved_tree = getattr(saved, "tree", saved)
        if saved_tree is None:
            return
        saved_leaves, _ = jax.tree_util.tree_flatten_with_path(
            saved_tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
        )
        have = {_path_str(p): tuple(x.shape) for p, x in saved_leaves}
        want = {
            _path_str(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
        }
        problems = []
        missing = sorted(set(have) - set(want))
        extra = sorted(set(want) - set(have))
        if missing:
            problems.append("not in the target: " + ", ".join(missing[:5]))
        if extra:
            problems.append("not in the checkpoint: " + ", ".join(extra[:5]))
        shapes = [
            f"{k} saved {list(have[k])} vs target {list(want[k])}"
            for k in sorted(set(have) & set(want))
            if have[k] != want[k]
        ]
        if shapes:
            problems.append("shape " + ", ".join(shapes[:5]))
        if problems:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match the restore "
                f"target: {'; '.join(problems)}"
            )

    def restore(self, step: int | None = None, *, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores a checkpoint onto the shardings of `target`.

        Waits for any save of this process still in flight first.

        Args:
          step: the global step to restore; None: the newest complete checkpoint.
          target: a pytree with the saved structure whose leaves are ``jax.Array`` or
            ``jax.ShapeDtypeStruct`` with a ``sharding``; each array is restored with that
            shape, dtype and sharding (which may use a different mesh than the one saved).

        Returns:
          ``(state, meta)``: the state pytree (same structure as `target`) and the meta dict.

        Raises:
          CheckpointError: no such checkpoint, or a target whose leaves lack shardings or do
            not match the saved tree (every mismatching path listed on one line).
        """
        abstract = jax.tree_util.tree_map_with_path(_abstract_leaf, target)
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(
                f"no complete checkpoint for step {step} in {self.directory}; "
                f"available: {steps or 'none'}"
            )
        self._check_target(step, abstract)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore()}
            ),
        )
        return restored[_STATE], dict(restored[_META] or {})

    def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
        """The meta dict of a complete checkpoint (the newest by default), without its state.

        Returns None when there is no complete checkpoint.
        """
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                return None
            step = steps[-1]
        if step not in steps:
            return None
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )
        return dict(restored[_META] or {})

    def delete(self, step: int) -> None:
        """Deletes the checkpoint of `step` (after any save in flight); a missing one is
        ignored. For checkpoints whose retention the caller decides (the best checkpoint)."""
        self.wait()
        if step in self._manager.all_steps():
            self._manager.delete(step)

    def wait(self) -> None:
        """Blocks until every save started by this process is complete on disk and sealed."""
        self._manager.wait_until_finished()
        if self._unsealed:
            self._seal()

    def close(self) -> None:
        """Waits for pending saves, seals them and releases the manager's threads."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
