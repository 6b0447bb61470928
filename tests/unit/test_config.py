"""The trainer's typed config: YAML files, dotted overrides, --help and one-line errors."""

import dataclasses
import os

import pytest
import yaml

from gti_jax.train.config import (
    ConfigError,
    TrainConfig,
    config_help,
    config_to_dict,
    load_config,
    parse_cli,
    save_config,
)


def _leaf_keys(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("init_kwargs", "shape", "rules"):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_defaults_are_the_quickstart():
    cfg = load_config(None, [])
    assert cfg == TrainConfig()
    assert cfg.model == "smollm2-135m"
    assert cfg.run_dir == "runs/quickstart"
    assert cfg.init == "mean"
    assert cfg.pad_to_multiple_of == 64
    assert cfg.ground.lr == 1e-2 and cfg.ground.steps == 60
    assert cfg.sft.lora_rank == 8 and cfg.sft.steps == 120
    assert cfg.sft.lora_alpha == 32
    assert cfg.sft.lora_dropout == 0.05
    assert cfg.sft.lora_targets == ("q", "k", "v", "o", "gate", "up", "down")
    assert cfg.eval.beams == 20 and cfg.eval.k == (5, 10, 20)
    assert cfg.mesh.shape == {"data": 1, "fsdp": 1, "tensor": 1}
    assert cfg.checkpoint.keep == 3
    assert cfg.distributed.enabled is False
    assert cfg.data.chat_template is True


def test_default_rules_mirror_the_model_sharding_table():
    from gti_jax.models.sharding import LOGICAL_RULES, MESH_AXES

    cfg = TrainConfig()
    assert cfg.mesh.rules == dict(LOGICAL_RULES)
    assert tuple(cfg.mesh.shape) == MESH_AXES
    assert load_config(None, ["mesh.shape.data=-1"]).mesh.shape["data"] == -1


def test_config_is_frozen():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sft.steps = 3  # type: ignore[misc]


def test_overrides_use_yaml_values():
    cfg = load_config(
        None,
        [
            "sft.steps=100",
            "eval.k=[5,10]",
            "mesh.shape={data: 2}",
            "mesh.shape.tensor=4",
            "mesh.rules.vocab=[fsdp, tensor]",
            "ground.lr=3e-4",  # YAML 1.1 reads this as a string; floats accept it
            "sft.lr=1",  # an int where a float is expected
            "sft.clip_norm=null",
            "init=mean_noise",
            "init_kwargs={std: 0.02}",
            "data.chat_template=false",
            "model=/ckpt/dir with spaces",
        ],
    )
    assert cfg.sft.steps == 100 and isinstance(cfg.sft.steps, int)
    assert cfg.eval.k == (5, 10)
    assert cfg.mesh.shape == {"data": 2, "fsdp": 1, "tensor": 4}  # merged over the defaults
    assert cfg.mesh.rules["vocab"] == ("fsdp", "tensor")
    assert cfg.mesh.rules["mlp"] == "tensor"
    assert cfg.ground.lr == pytest.approx(3e-4)
    assert cfg.sft.lr == 1.0 and isinstance(cfg.sft.lr, float)
    assert cfg.sft.clip_norm is None
    assert cfg.init == "mean_noise" and cfg.init_kwargs == {"std": 0.02}
    assert cfg.data.chat_template is False
    assert cfg.model == "/ckpt/dir with spaces"


def test_later_override_wins_and_file_comes_first(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": "hf/dir",
                "seed": 7,
                "data": {
                    "tokens": "tokens.jsonl",
                    "pairs": "pairs.jsonl",
                    "sft": "sft.jsonl",
                    "eval": "eval.jsonl",
                    "max_len": 128,
                },
                "sft": {"steps": 50, "lora_rank": 8},
                "mesh": {"shape": {"data": 4, "tensor": 2}},
            }
        )
    )
    cfg = load_config(str(path), ["sft.steps=5", "sft.steps=6"])
    assert cfg.model == "hf/dir" and cfg.seed == 7
    assert cfg.data.tokens == "tokens.jsonl" and cfg.data.max_len == 128
    assert cfg.sft.steps == 6 and cfg.sft.lora_rank == 8
    assert cfg.sft.lr == TrainConfig().sft.lr  # untouched keys keep their defaults
    assert cfg.mesh.shape == {"data": 4, "fsdp": 1, "tensor": 2}


def test_empty_yaml_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(str(path), []) == TrainConfig()


def test_save_config_round_trips_and_is_atomic(tmp_path):
    cfg = load_config(None, ["sft.lora_rank=8", "eval.k=[1, 2]", "init_kwargs={scale: 2}"])
    out = tmp_path / "sub" / "config.yaml"
    save_config(cfg, str(out))
    assert load_config(str(out), []) == cfg
    assert os.listdir(out.parent) == ["config.yaml"]  # no temporary file left behind
    plain = yaml.safe_load(out.read_text())
    assert plain == config_to_dict(cfg)
    assert plain["eval"]["k"] == [1, 2]  # tuples are written as plain lists


def test_config_to_dict_covers_every_key():
    d = config_to_dict(TrainConfig())
    keys = set(_leaf_keys(d))
    for key in ["data.tokens", "sft.lora_targets", "mesh.rules", "distributed.process_id"]:
        assert key in keys
    assert yaml.safe_load(yaml.safe_dump(d)) == d


def test_help_lists_every_key_with_type_default_and_doc():
    text = config_help()
    for key in _leaf_keys(config_to_dict(TrainConfig())):
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(key + " (")), None)
        assert line is not None, f"{key} missing from config_help()"
        assert "default" in line
    assert "sft.steps (int, default 120)" in text
    assert "ground.lr (float, default 0.01)" in text
    assert "init ('mean'|'mean_noise'|'mean_cov'|'normal'|'description', default mean)" in text
    # every key carries its doc string: the line after each key line is indented prose
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        if ln.startswith("  ") and not ln.startswith("   ") and " (" in ln:
            assert lines[i + 1].startswith("      ") and lines[i + 1].strip(), ln
    assert all(len(ln) <= 100 or "default" in ln for ln in lines)


def test_parse_cli_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli(["sft.steps=3", "--help"])
    assert exc.value.code == 0
    assert "sft.steps (int" in capsys.readouterr().out


def test_parse_cli_config_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  steps: 12\nseed: 3\n")
    for argv in (["--config", str(path), "seed=4"], [f"--config={path}", "seed=4"]):
        cfg = parse_cli(argv)
        assert (cfg.sft.steps, cfg.seed) == (12, 4)
    assert parse_cli([]) == TrainConfig()


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


# (yaml file text or None, overrides, fragments the one-line message must contain)
ERROR_CASES = [
    (None, ["sft.stpes=10"], ["unknown config key 'sft.stpes'", "did you mean 'sft.steps'?"]),
    (None, ["sftt.lr=1"], ["unknown config key 'sftt.lr'", "did you mean 'sft.lr'?"]),
    ("sft:\n  batchsize: 4\n", [], ["unknown config key 'sft.batchsize'", "'sft.batch_size'"]),
    (None, ["sft.steps=ten"], ["sft.steps must be an int, got 'ten'"]),
    (None, ["sft.steps=1.5"], ["sft.steps must be an int, got 1.5"]),
    (None, ["ground.lr=fast"], ["ground.lr must be a number, got 'fast'"]),
    (None, ["data.chat_template=1"], ["data.chat_template must be a bool", "got 1"]),
    (None, ["checkpoint.async_save=yes please"], ["checkpoint.async_save must be a bool"]),
    (None, ["init=zeros"], ["init must be one of 'mean', 'mean_noise'", "got 'zeros'"]),
    (None, ["sft.compute_dtype=float16"], ["sft.compute_dtype must be one of 'float32'"]),
    (None, ["sft.lora_targets=[q, qkv]"], ["sft.lora_targets must be a list of 'q'", "'qkv'"]),
    (None, ["sft.steps"], ["malformed override 'sft.steps'", "no '='", "key=value"]),
    (None, ["=3"], ["malformed override '=3'", "empty key"]),
    (None, ["eval.k=[5, 10"], ["cannot parse the value of override 'eval.k=[5, 10'"]),
    ("- a\n- b\n", [], ["must hold a mapping", "got list"]),
    ("sft: [1\n", [], ["is not valid YAML", "line"]),
    (None, ["sft.steps=-5"], ["sft.steps must be >= 0, got -5"]),
    (None, ["ground.steps=-1"], ["ground.steps must be >= 0, got -1"]),
    (None, ["sft.batch_size=0"], ["sft.batch_size must be >= 1, got 0"]),
    (None, ["eval.batch_size=-2"], ["eval.batch_size must be >= 1, got -2"]),
    (None, ["sft.batch_size=6", "sft.grad_accum=4"], ["divisible by sft.grad_accum"]),
    (None, ["ground.lr=0"], ["ground.lr must be > 0"]),
    (None, ["sft.lora_dropout=1.0"], ["sft.lora_dropout must be in [0, 1)"]),
    (None, ["eval.k=[5, 50]"], ["eval.k entry 50 exceeds eval.beams (20)"]),
    (None, ["sft=3"], ["sft must be a mapping", "sft.steps="]),
    (None, ["mesh.shape.data=0"], ["mesh.shape.data must be >= 1 (or -1), got 0"]),
    (None, ["mesh.shape={data: -1, fsdp: -1}"], ["-1 (the remaining devices) to one axis only"]),
    (None, ["mesh.shape.data=two"], ["mesh.shape.data must be an int, got 'two'"]),
    (None, ["mesh.rules.vocab=model"], ["mesh.rules.vocab refers to mesh axis 'model'"]),
    (None, ["data.sft=sft.jsonl"], ["data.sft is set but data.tokens is not"]),
    (
        None,
        ["distributed.num_processes=2", "distributed.process_id=2"],
        ["distributed.process_id (2) must be < distributed.num_processes (2)"],
    ),
]


@pytest.mark.parametrize("yaml_text, overrides, fragments", ERROR_CASES)
def test_errors_are_one_clear_line(tmp_path, yaml_text, overrides, fragments):
    path = None if yaml_text is None else _write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides)
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(missing, [])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_cli(["--config", missing])


def test_cli_usage_errors():
    with pytest.raises(ConfigError, match="--config needs a file"):
        parse_cli(["--config"])
    with pytest.raises(ConfigError, match="unknown option '--verbose'"):
        parse_cli(["--verbose"])
    with pytest.raises(ConfigError, match="no '='"):
        parse_cli(["steps"])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_overrides_are_checked_before_the_file_is_read(tmp_path):
    # a syntax error in an override is reported even when the file is also missing
    with pytest.raises(ConfigError, match="malformed override"):
        load_config(str(tmp_path / "missing.yaml"), ["oops"])
