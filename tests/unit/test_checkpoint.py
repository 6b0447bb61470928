"""Orbax checkpoints (round trip, pruning, async, interrupted saves) and the rows artifact."""

import asyncio
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from gti_jax.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    NoVerifiedCheckpointError,
    RowsFileNotFoundError,
    load_rows,
    save_rows,
)
from tests.helpers.damage import drop_metadata, flip_bit, truncate_array


def _state(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "params": {
            "emb": jax.random.normal(k1, (6, 4), jnp.float32),
            "new_rows": jax.random.normal(k2, (3, 4)).astype(jnp.bfloat16),
        },
        "opt": [jnp.array(7, jnp.int32), jax.random.uniform(k3, (5,))],
    }


def _bitwise_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _assert_trees_bitwise(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    assert all(_bitwise_equal(x, y) for x, y in zip(la, lb, strict=True))


META = {"stage": "ground", "position": 96, "seed": 0, "key": [0, 42]}


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_is_bitwise_with_meta(tmp_path, async_save):
    state = _state()
    with Checkpointer(tmp_path / "ckpt", keep=3, async_save=async_save) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(5, state, META) is True
        ckpt.wait()
        assert ckpt.latest_step() == 5
        target = jax.tree.map(jnp.zeros_like, state)  # arrays as the target
        restored, meta = ckpt.restore(target=target)
    _assert_trees_bitwise(restored, state)
    assert meta == META
    assert restored["params"]["new_rows"].dtype == jnp.bfloat16


def test_restore_with_shape_dtype_structs(tmp_path):
    state = _state(1)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), state)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, state, {"stage": "sft"})
        restored, meta = ckpt.restore(0, target=target)
    _assert_trees_bitwise(restored, state)
    assert meta == {"stage": "sft"}


def test_keep_prunes_old_checkpoints(tmp_path):
    with Checkpointer(tmp_path, keep=2, async_save=True) as ckpt:
        for step in (10, 20, 30, 40):
            assert ckpt.save(step, {"w": jnp.full((2,), step, jnp.float32)}, {"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [30, 40]
        restored, meta = ckpt.restore(30, target={"w": jnp.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == ["30", "40"]
    assert meta == {"step": 30} and np.all(np.asarray(restored["w"]) == 30)


def test_async_save_then_wait(tmp_path):
    state = {"w": jnp.arange(1000, dtype=jnp.float32)}
    ckpt = Checkpointer(tmp_path, keep=3, async_save=True)
    assert ckpt.save(1, state, {"stage": "sft"})
    state = {"w": state["w"] + 1}  # the caller moves on while the write finishes
    ckpt.wait()
    assert ckpt.all_steps() == [1]
    assert not any("tmp" in name for name in os.listdir(tmp_path))
    restored, _ = ckpt.restore(target=state)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(1000, dtype=np.float32))
    ckpt.close()
    # a fresh Checkpointer (as after a restart) sees the same steps
    with Checkpointer(tmp_path) as again:
        assert again.latest_step() == 1


def test_steps_must_increase(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.save(3, {"w": jnp.ones(2)}, {})
        assert ckpt.save(3, {"w": jnp.zeros(2)}, {}) is False  # already saved
        assert ckpt.save(2, {"w": jnp.zeros(2)}, {}) is False  # older than the latest
        restored, _ = ckpt.restore(target={"w": jnp.zeros(2)})
        assert ckpt.all_steps() == [3]
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones(2))


def test_interrupted_save_is_ignored(tmp_path, monkeypatch):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(5, {"w": jnp.full((3,), 5.0)}, {"stage": "ground"})
    # orbax removes leftovers in a background thread; a slow removal (a loaded machine) must
    # still be finished when the Checkpointer is open (it failed by chance before it waited)
    from orbax.checkpoint._src.path import async_path

    rmtree = async_path.rmtree

    async def slow_rmtree(path):
        await asyncio.sleep(0.5)
        return await rmtree(path)

    monkeypatch.setattr(async_path, "rmtree", slow_rmtree)
    # an interrupted save of step 9 (complete-looking contents, never renamed) ...
    shutil.copytree(tmp_path / "5", tmp_path / "9.orbax-checkpoint-tmp-1700000000")
    # ... and a hand-made step directory with no orbax marker
    os.makedirs(tmp_path / "12" / "state")
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.latest_step() == 5
        assert ckpt.all_steps() == [5]
        restored, meta = ckpt.restore(target={"w": jnp.zeros(3)})
        assert meta == {"stage": "ground"}
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.full(3, 5.0))
        with pytest.raises(CheckpointError, match="no complete checkpoint for step 9"):
            ckpt.restore(9, target={"w": jnp.zeros(3)})
    # the leftover temporary directory is cleaned up when the directory is opened
    assert not (tmp_path / "9.orbax-checkpoint-tmp-1700000000").exists()


def test_restore_errors(tmp_path):
    with Checkpointer(tmp_path / "empty", async_save=False) as ckpt:
        with pytest.raises(CheckpointError, match="no complete checkpoint in"):
            ckpt.restore(target={"w": jnp.zeros(2)})
    with Checkpointer(tmp_path / "c", async_save=False) as ckpt:
        ckpt.save(4, {"a": jnp.zeros((2, 3)), "b": jnp.zeros(2)}, {})
        with pytest.raises(CheckpointError, match=r"step 7 .*available: \[4\]"):
            ckpt.restore(7, target={"a": jnp.zeros((2, 3)), "b": jnp.zeros(2)})
        with pytest.raises(CheckpointError, match=r"a saved \[2, 3\] vs target \[3, 3\]"):
            ckpt.restore(target={"a": jnp.zeros((3, 3)), "b": jnp.zeros(2)})
        with pytest.raises(CheckpointError, match="not in the target: b"):
            ckpt.restore(target={"a": jnp.zeros((2, 3))})
        with pytest.raises(CheckpointError, match="a has no sharding"):
            ckpt.restore(target={"a": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": 0})
        with pytest.raises(CheckpointError, match="b is a ndarray"):
            ckpt.restore(target={"a": jnp.zeros((2, 3)), "b": np.zeros(2)})


def test_save_errors_before_writing(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(CheckpointError, match="JSON-serializable"):
            ckpt.save(1, {"w": jnp.ones(2)}, {"key": jnp.ones(2)})
        with pytest.raises(CheckpointError, match="step must be an int >= 0"):
            ckpt.save(-1, {"w": jnp.ones(2)}, {})
        assert ckpt.all_steps() == []
    assert os.listdir(tmp_path) == []
    with pytest.raises(CheckpointError, match="keep must be an int >= 1"):
        Checkpointer(tmp_path, keep=0)


def test_rows_round_trip_bf16(tmp_path):
    rows = np.random.default_rng(0).normal(size=(3, 8)).astype(ml_dtypes.bfloat16)
    meta = {"tokens": ["<a_1>", "<a_2>", "<a_3>"], "first_row": 49152, "init": "mean"}
    path = tmp_path / "out" / "grounded_rows.safetensors"
    save_rows(path, rows, meta)
    assert os.listdir(path.parent) == ["grounded_rows.safetensors"]
    got, got_meta = load_rows(path)
    assert _bitwise_equal(got, rows)
    assert got_meta == meta
    # overwriting replaces the file whole
    save_rows(path, np.zeros((1, 2), np.float32), {})
    got, got_meta = load_rows(path)
    assert got.shape == (1, 2) and got_meta == {}


def test_rows_accepts_jax_arrays(tmp_path):
    rows = jnp.arange(8, dtype=jnp.float32).reshape(2, 4)
    save_rows(tmp_path / "r.safetensors", rows, {"n": 2})
    got, meta = load_rows(tmp_path / "r.safetensors")
    np.testing.assert_array_equal(got, np.asarray(rows))
    assert meta == {"n": 2}


def test_rows_errors(tmp_path):
    with pytest.raises(RowsFileNotFoundError, match="grounded-rows file not found"):
        load_rows(tmp_path / "missing.safetensors")
    assert issubclass(RowsFileNotFoundError, FileNotFoundError)
    with pytest.raises(CheckpointError, match=r"\[N, D\]"):
        save_rows(tmp_path / "x.safetensors", np.zeros(3), {})
    with pytest.raises(CheckpointError, match="not JSON-serializable"):
        save_rows(tmp_path / "x.safetensors", np.zeros((1, 2)), {"a": object()})
    assert not (tmp_path / "x.safetensors").exists()
    other = tmp_path / "other.safetensors"
    save_file({"weight": np.zeros((2, 2), np.float32)}, str(other))
    with pytest.raises(CheckpointError, match="not a grounded-rows file"):
        load_rows(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_rows(junk)


# --------------------------------------------------------------------------------------------
# Verification: a damaged newest checkpoint is skipped, with the reason.
# --------------------------------------------------------------------------------------------


def _save_three(directory, async_save):
    with Checkpointer(directory, keep=5, async_save=async_save) as ckpt:
        for step in (2, 4, 6):
            ckpt.save(step, {"w": jnp.full((64,), float(step))}, {"step": step})


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (truncate_array, r"has \d+ bytes, \d+ were saved"),
        (flip_bit, "does not match its saved SHA-256"),
        (drop_metadata, "state/_METADATA is missing"),
    ],
)
@pytest.mark.parametrize("async_save", [False, True])
def test_damaged_newest_checkpoint_is_skipped(tmp_path, damage, why, async_save):
    _save_three(tmp_path, async_save)
    with Checkpointer(tmp_path, keep=5) as ckpt:
        assert [ckpt.verify(s) for s in (2, 4, 6)] == [None, None, None]
    damage(tmp_path / "6")
    with Checkpointer(tmp_path, keep=5) as ckpt:
        step, skipped = ckpt.newest_verified()
        assert step == 4 and [s for s, _ in skipped] == [6]
        assert re.search(why, skipped[0][1]), skipped
        # set aside (kept, not deleted), so the resumed run can save step 6 again
        assert ckpt.all_steps() == [2, 4] and (tmp_path / "6.unverified").is_dir()
        restored, meta = ckpt.restore(step, target={"w": jnp.zeros(64)})
        assert meta == {"step": 4} and np.all(np.asarray(restored["w"]) == 4.0)
        assert ckpt.save(6, {"w": jnp.full((64,), 60.0)}, {"step": 6})
        ckpt.wait()
        assert ckpt.verify(6) is None


def test_no_checkpoint_verifies_names_the_directory(tmp_path):
    _save_three(tmp_path, False)
    for step in (2, 4, 6):
        flip_bit(tmp_path / str(step))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(NoVerifiedCheckpointError) as e:
            ckpt.newest_verified()
    msg = str(e.value)
    assert "\n" not in msg and f"no checkpoint in {tmp_path} verifies" in msg, msg
    assert sorted(os.listdir(tmp_path)) == ["2", "4", "6"]  # nothing moved


def test_unsealed_save_is_resumed_from_and_sealed(tmp_path, capfd):
    """A save orbax finalized but never sealed (an older gti_jax, or stopped between orbax's
    commit and the seal) is complete: it is resumed from, said so in one line, and sealed;
    nothing is set aside. A damaged sealed step newer than it is still skipped."""
    _save_three(tmp_path, False)
    (tmp_path / "6" / "gti_checksums.json").unlink()
    with Checkpointer(tmp_path) as ckpt:
        step, skipped = ckpt.newest_verified()
    assert (step, skipped) == (6, [])
    err = capfd.readouterr().err
    assert "step 6 has no checksum manifest" in err and "sealed now" in err, err
    assert (tmp_path / "6" / "gti_checksums.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["2", "4", "6"]
    for step in (2, 4):  # unsealed older steps under a damaged sealed newer one
        (tmp_path / str(step) / "gti_checksums.json").unlink()
    truncate_array(tmp_path / "6")
    with Checkpointer(tmp_path) as ckpt:
        step, skipped = ckpt.newest_verified()
    assert step == 4 and [s for s, _ in skipped] == [6]
