"""One argument style for every CLI (gti_jax.config.parse_cli): key=value, --key value,
--key=value, bare --flag, NAME=VALUE entries of mapping keys, --print-config, --config NAME."""

import pytest
import yaml

from gti_jax import config as engine
from gti_jax import diagnose, extend, pipeline
from gti_jax.config import ConfigError
from gti_jax.rec import prepare
from gti_jax.train import __main__ as train_main
from gti_jax.train.config import parse_cli


@pytest.mark.parametrize(
    "args",
    [
        ["sft.steps=100", "eval.k=[5,10]", "mesh.shape.data=2", "resume=false"],
        ["--sft.steps", "100", "--eval.k", "[5,10]", "--mesh.shape.data", "2", "--resume", "false"],
        ["--sft.steps=100", "--eval.k=[5,10]", "--mesh.shape.data=2", "--resume=false"],
        ["--sft.steps", "100", "eval.k=[5,10]", "--mesh.shape", "data=2", "resume=false"],
        ["--sft.steps", "100", "--eval.k=[5,10]", "--mesh.shape", "{data: 2}", "--resume=no"],
    ],
)
def test_the_three_spellings_mean_the_same(args):
    cfg = parse_cli(args)
    assert (cfg.sft.steps, cfg.eval.k, cfg.mesh.shape["data"], cfg.resume) == (
        100,
        (5, 10),
        2,
        False,
    )
    assert cfg.mesh.shape["fsdp"] == 1  # an entry merges over the defaults


def test_flags_negative_numbers_and_text_keys():
    # a bare bool option is true (the defaults of these two are false)
    cfg = parse_cli(["--log.tensorboard", "--seed", "3", "--distributed.enabled"])
    assert (cfg.log.tensorboard, cfg.seed, cfg.distributed.enabled) == (True, 3, True)
    assert parse_cli(["--log.tensorboard", "false"]).log.tensorboard is False
    assert parse_cli(["--mesh.shape.data", "-1"]).mesh.shape["data"] == -1
    # a key that takes text keeps it as written (YAML would read 2024 as an int)
    assert parse_cli(["--run_dir", "2024"]).run_dir == "2024"
    assert diagnose.parse_cli(["--export", "e", "--new-ids", "10:20"]).new_ids == "10:20"
    assert parse_cli(["--data.pairs", "null"]).data.pairs is None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["--sft.stepz", "3"],
            "unknown option '--sft.stepz' (no config key 'sft.stepz'; did you mean 'sft.steps'?)",
        ),
        (["--seed"], "option '--seed' needs a value: --seed VALUE or seed=VALUE"),
        (["--seed", "--resume"], "option '--seed' needs a value"),
        (["-x"], "unknown option '-x'"),
        (["--mesh.shape", "data"], "expected NAME=VALUE"),
        (["--config"], "--config needs a file"),
        (
            ["--config", "no-such-config"],
            "config file not found: no-such-config; give a YAML file or a shipped config's name (curve_prompt, ",
        ),
    ],
)
def test_bad_command_lines_are_one_line(args, needle):
    with pytest.raises(ConfigError) as e:
        pipeline.parse_cli(args)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_print_config_prints_the_resolved_config_and_exits(capsys):
    args = ["--config", "quickstart", "--print-config", "--sft.steps", "7", "rec.levels=2"]
    assert train_main.main(args) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    cfg = pipeline.load_config(engine.find_config("quickstart"), ["sft.steps=7", "rec.levels=2"])
    assert shown == engine.to_dict(cfg) and shown["sft"]["steps"] == 7
    assert shown["run_dir"] == "runs/quickstart"  # from the file, not only the defaults
    # a bad value is still an error line (exit 2), not a printed config
    assert train_main.main(["--print-config", "sft.steps=-1"]) == 2
    assert "sft.steps must be >= 0" in capsys.readouterr().err


def test_print_config_round_trips_through_a_file(tmp_path, capsys):
    assert train_main.main(["--print-config", "--eval.k", "[1,2]", "--init", "normal"]) == 0
    path = tmp_path / "cfg.yaml"
    path.write_text(capsys.readouterr().out)
    assert pipeline.load_config(str(path)) == pipeline.load_config(
        None, ["eval.k=[1,2]", "init=normal"]
    )


def test_config_by_name_is_the_shipped_file():
    from tests.helpers.tiny_task import REPO

    by_name = pipeline.parse_cli(["--config", "quickstart"])
    assert by_name == pipeline.load_config(str(REPO / "configs" / "quickstart.yaml"))
    assert by_name == pipeline.parse_cli(["--config=quickstart.yaml"])
    # quickstart.yaml holds the defaults; movielens.yaml sets other values
    movielens = pipeline.parse_cli(["--config", "movielens"])
    assert movielens == pipeline.load_config(str(REPO / "configs" / "movielens.yaml"))
    assert movielens != pipeline.load_config(None)


def test_extend_takes_the_same_style(capsys):
    cfg = extend.parse_cli(
        [
            "--model",
            "m",
            "--tokens=t",
            "out=o",
            "--init-arg",
            "std=0.01",
            "--init-arg",
            "hf_compat=true",
            "--pad-to-multiple-of",
            "64",
            "--skip-existing",
        ]
    )
    assert cfg == extend.ExtendConfig(
        model="m",
        tokens="t",
        out="o",
        init_kwargs={"std": 0.01, "hf_compat": True},
        pad_to_multiple_of=64,
        skip_existing=True,
    )
    assert (
        extend.parse_cli(
            ["--model", "m", "--tokens", "t", "--out", "o", "--pad_to_multiple_of=8"]
        ).pad_to_multiple_of
        == 8
    )
    assert extend.main(["--tokens", "t", "--out", "o"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: --model is required; see python -m gti_jax.extend --help"
    )
    assert extend.main(["--model", "m", "--tokens", "t", "--out", "o", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"] == "m"
    assert extend.main(["--help"]) == 0
    assert "--init-arg NAME=VALUE" in capsys.readouterr().out


def test_prepare_and_diagnose_take_the_same_style(tmp_path, capsys):
    assert prepare.main(["--print-config", "--out", str(tmp_path / "o"), "--rec.levels", "2"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["out"] == str(tmp_path / "o") and shown["rec"]["levels"] == 2
    assert prepare.main(["rec.levels=2"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert diagnose.parse_cli([str(tmp_path)]).run_dir == str(tmp_path)
    assert diagnose.main(["--print-config", "--export", "e", "--tokens", "t.jsonl"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["tokens"] == "t.jsonl"
    assert diagnose.main(["--no-such", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown option '--no-such'")
    assert diagnose.main([str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
