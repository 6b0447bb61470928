"""A run or a prepared data directory made by an older gti_jax, before a setting existed,
still resumes when that setting is at its default (the older version behaved as the default
does), and is still refused when it is not."""

import json

import pytest
import yaml

from gti_jax.rec.config import RecConfig
from gti_jax.rec.prepare import OUTPUT_FILES, PrepareError, _check_existing, _recorded_config
from gti_jax.train.config import load_config, save_config
from gti_jax.train.inputs import TrainError
from gti_jax.train.run import _check_run_dir


def _saved_without(run_dir, cfg, key: str) -> None:
    """Writes `cfg` as run_dir/config.yaml with `key` (dotted) removed, as an older version
    that did not know the key would have written it."""
    save_config(cfg, run_dir / "config.yaml")
    d = yaml.safe_load((run_dir / "config.yaml").read_text())
    *parents, last = key.split(".")
    node = d
    for p in parents:
        node = node[p]
    del node[last]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(d))


def test_run_saved_before_a_key_existed_resumes_at_its_default(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(None, [f"run_dir={run_dir}", "resume=true"])
    _saved_without(run_dir, cfg, "compute.loss_chunk")
    assert _check_run_dir(cfg) == run_dir


def test_run_saved_before_a_key_existed_is_refused_off_its_default(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = load_config(None, [f"run_dir={run_dir}", "resume=true"])
    _saved_without(run_dir, saved, "compute.loss_chunk")
    cfg = load_config(None, [f"run_dir={run_dir}", "resume=true", "compute.loss_chunk=1024"])
    with pytest.raises(TrainError, match=r"different config \(differs in compute\.loss_chunk\)"):
        _check_run_dir(cfg)


def _prepared(out, record: dict) -> None:
    out.mkdir()
    for name in OUTPUT_FILES.values():
        (out / name).write_text("{}")
    (out / OUTPUT_FILES["stats"]).write_text(json.dumps({"config": record}))


def test_data_prepared_before_a_setting_existed_is_reused(tmp_path):
    recorded = _recorded_config(RecConfig(), 0, "smollm2-135m", 128)
    older = json.loads(json.dumps(recorded))
    unset = [k for k, v in older["rec"].items() if v is None]
    assert unset  # settings that are off by default (None)
    del older["rec"][unset[0]]
    _prepared(tmp_path / "data", older)
    assert _check_existing(tmp_path / "data", recorded) is True


def test_data_prepared_with_other_settings_names_them(tmp_path):
    recorded = _recorded_config(RecConfig(), 0, "smollm2-135m", 128)
    other = json.loads(json.dumps(recorded))
    other["rec"]["codebook_size"] += 1
    _prepared(tmp_path / "data", other)
    with pytest.raises(PrepareError, match=r"differing: rec\.codebook_size\)"):
        _check_existing(tmp_path / "data", recorded)
