"""Bad input through both CLIs: one ``error:`` line naming the problem and the fix, a non-zero
exit, no traceback, and nothing left behind (no run directory, no ``--out``, no temporaries).

Each case is run in-process through ``main(argv)`` (fast); two run as real subprocesses.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from gti_jax import extend
from gti_jax.train.__main__ import main as train_main
from tests.helpers.damage import truncated_model_copy
from tests.helpers.hf_models import make_tiny_hf_model
from tests.helpers.tiny_task import TOKENS, train_command, train_env


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """A checkpoint whose tokenizer has more tokens (375) than its embedding has rows (300)."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("short"), "llama", vocab_size=300)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _model_copy(task, work: Path, name: str, files: dict[str, str] | None = None) -> Path:
    """A copy of the tiny task's model under `work`, with `files` (name -> text) replaced."""
    dst = work / name
    shutil.copytree(task.model, dst)
    for file, text in (files or {}).items():
        (dst / file).write_text(text)
    return dst


def _truncated_model(task, work):
    return truncated_model_copy(task.model, work / "truncated")


def _wrong_hidden_size(task, work):
    dst = _model_copy(task, work, "wrong_hidden")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["hidden_size"] = 64  # the tensors are 48 wide
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _tokens(work, rows, name="tokens.jsonl"):
    return _write(work / name, "".join(json.dumps(r) + "\n" for r in rows))


NL = "\n"
NOT_UTF8 = (
    b'{"token": "<x_1>", "description": "ok"}\n{"token": "<x_2>", "description": "caf\xe9 \xff"}\n'
)
NO_COMPLETION_KEY = '{"x": 1}\n'
CANDS_NOT_UTF8 = b"<i_0>\n<i_1>\xfe\n"
LONG_COMPLETION = json.dumps({"prompt": "p", "completion": " ".join(["word"] * 300)}) + "\n"
BAD_JSONL = '{"token": "<x_1>"}\n{oops\n'
NO_COMPLETION = '{"prompt": "hello"}\n'


def _data_file(key: str, name: str, content: str | bytes):
    """A case maker: ``data.<key>=`` a file `name` holding `content`, written under work."""

    def make(task, work, short_model):
        path = work / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return [f"data.{key}={path}"]

    return make


def _a_file(work):
    return _write(work / "a_file", "not a directory\n")


# --------------------------------------------------------------------------------------------
# python -m gti_jax.train: each case gives overrides on top of the tiny task (+ run_dir).
# --------------------------------------------------------------------------------------------

TRAIN = {
    "malformed tokens jsonl": (
        _data_file("tokens", "bad.jsonl", BAD_JSONL),
        ["bad.jsonl:2"],
    ),
    "malformed sft jsonl": (
        _data_file("sft", "sft.jsonl", NO_COMPLETION),
        ["sft.jsonl:1"],
    ),
    "malformed eval jsonl": (
        _data_file("eval", "eval.jsonl", "not json at all" + NL),
        ["eval.jsonl:1"],
    ),
    "missing tokens file": (
        lambda t, w, s: [f"data.tokens={w / 'none.jsonl'}"],
        ["none.jsonl", "fix the path"],
    ),
    "missing sft file": (lambda t, w, s: [f"data.sft={w / 'nope.jsonl'}"], ["nope.jsonl"]),
    "missing model": (
        lambda t, w, s: [f"model={w / 'no_model'}"],
        ["no_model"],
    ),
    "token already in vocabulary": (
        lambda t, w, s: [
            f"data.tokens={_tokens(w, [{'token': '<|im_end|>', 'description': 'end'}])}"
        ],
        ["<|im_end|>", "already", "remove them from the tokens file"],
    ),
    "duplicate tokens": (
        lambda t, w, s: [f"data.tokens={_tokens(w, [{'token': '<x_1>', 'description': 'a'}] * 2)}"],
        ["<x_1>", "more than once"],
    ),
    "description init without descriptions": (
        lambda t, w, s: [
            f"data.tokens={_tokens(w, [{'token': '<x_1>', 'description': ''}])}",
            "init=description",
            "ground.steps=0",
        ],
        ["description"],
    ),
    "grounding without descriptions or pairs": (
        lambda t, w, s: [f"data.tokens={_tokens(w, [{'token': '<x_1>'}])}"],
        ["no description", "give data.pairs"],
    ),
    "unknown config key": (
        lambda t, w, s: ["sft.stpes=3"],
        ["sft.stpes", "did you mean 'sft.steps'"],
    ),
    "wrong type": (lambda t, w, s: ["ground.lr=fast"], ["ground.lr", "a number"]),
    "config file missing": (
        lambda t, w, s: ["--config", str(w / "nope.yaml")],
        ["nope.yaml"],
    ),
    "mesh does not divide the devices": (
        lambda t, w, s: ["mesh.shape={data: 3}"],
        ["8", "multiply"],
    ),
    "mesh does not divide the batch": (
        lambda t, w, s: ["mesh.shape={data: 8}"],
        ["ground.batch_size", "multiple of 8"],
    ),
    "config disagrees with the tensors": (
        lambda t, w, s: [f"model={_wrong_hidden_size(t, w)}"],
        ["config.json", "contradicts", "hidden_size=64", "embed_tokens", "[375, 48]"],
    ),
    "truncated safetensors": (
        lambda t, w, s: [f"model={_truncated_model(t, w)}"],
        ["model.safetensors"],
    ),
    # every data file is read and checked before any stage runs (the candidates file used
    # to be read only after grounding)
    "empty candidates file": (
        _data_file("candidates", "cands.txt", NL),
        ["cands.txt", "empty"],
    ),
    "empty eval file": (
        _data_file("eval", "eval.jsonl", ""),
        ["eval.jsonl", "empty"],
    ),
    "empty pairs file": (
        _data_file("pairs", "pairs.jsonl", NL + NL),
        ["pairs.jsonl", "empty"],
    ),
    "malformed candidates jsonl": (
        _data_file("candidates", "cands.jsonl", NO_COMPLETION_KEY),
        ["cands.jsonl:1", "completion"],
    ),
    "sft completion longer than max_len": (
        _data_file("sft", "sft.jsonl", LONG_COMPLETION),
        ["sft.jsonl", "max_len"],
    ),
    "tokens file not UTF-8": (
        _data_file("tokens", "tokens.jsonl", NOT_UTF8),
        ["tokens.jsonl:2", "not utf-8", "0xe9"],
    ),
    "candidates file not UTF-8": (
        _data_file("candidates", "c.txt", CANDS_NOT_UTF8),
        ["c.txt:2", "not utf-8"],
    ),
    "tokenizer larger than the embedding": (
        lambda t, w, s: [f"model={s}"],
        ["375", "300"],
    ),
    "run_dir under a file": (
        lambda t, w, s: [f"run_dir={_a_file(w) / 'run'}"],
        ["run_dir", "writable"],
    ),
}


def _run_dir_of(args, default):
    for a in reversed(args):
        if a.startswith("run_dir="):
            return Path(a.split("=", 1)[1])
    return default


def _check_one_error_line(err: str, needles) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in err.strip().splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    for n in needles:
        assert n.lower() in errors[0].lower(), (n, errors[0])
    return errors[0]


@pytest.mark.parametrize("case", list(TRAIN))
def test_train_bad_input(task, short_model, tmp_path, capsys, case):
    make, needles = TRAIN[case]
    work = tmp_path / "work"
    work.mkdir()
    extra = make(task, work, short_model)
    run_dir = _run_dir_of(extra, tmp_path / "run")
    argv = [*task.args, f"run_dir={tmp_path / 'run'}", *extra]
    before = sorted(p.name for p in work.iterdir())
    rc = train_main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    _check_one_error_line(err, needles)
    assert len(err.strip().splitlines()) == 1, err  # the error line is all of stderr
    assert not run_dir.exists()
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in work.iterdir()) == before  # no temporary left behind


def test_train_resume_with_other_config_leaves_run_untouched(task, tmp_path, capsys):
    """A run directory holding another run's config is refused, and nothing in it changes."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    from gti_jax.pipeline import load_config, save_config

    save_config(load_config(None, [*task.args, f"run_dir={run_dir}"]), run_dir / "config.yaml")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    rc = train_main([*task.args, f"run_dir={run_dir}", "sft.steps=5"])
    err = capsys.readouterr().err
    assert rc == 2
    _check_one_error_line(err, ["different config", "sft.steps", "new run_dir"])
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


# --------------------------------------------------------------------------------------------
# python -m gti_jax.extend
# --------------------------------------------------------------------------------------------

# every bad-input case of the extend CLI (the former extend table of test_extend_cli.py is
# merged in: where both had a case, its needles are the union)
EXTEND = {
    "malformed tokens jsonl": (
        lambda t, w, s: ["--tokens", str(_write(w / "bad.jsonl", BAD_JSONL))],
        ["bad.jsonl:2"],
    ),
    "missing tokens file": (lambda t, w, s: ["--tokens", str(w / "none.jsonl")], ["none.jsonl"]),
    "empty tokens file": (
        lambda t, w, s: ["--tokens", str(_write(w / "empty.txt", ""))],
        ["empty"],
    ),
    "whitespace token": (
        lambda t, w, s: ["--tokens", str(_write(w / "w.jsonl", '{"token": "  "}\n'))],
        ["whitespace"],
    ),
    "missing model": (
        lambda t, w, s: ["--model", str(w / "no_model")],
        ["no_model", "no such directory"],
    ),
    "model dir without config": (lambda t, w, s: ["--model", str(w)], ["config.json"]),
    "config not json": (
        lambda t, w, s: ["--model", str(_model_copy(t, w, "c", {"config.json": "{oops"}))],
        ["not valid JSON"],
    ),
    "token already in vocabulary": (
        lambda t, w, s: ["--tokens", str(_tokens(w, [{"token": "<|im_end|>"}]))],
        ["<|im_end|>", "--skip-existing"],
    ),
    "duplicate tokens": (
        lambda t, w, s: ["--tokens", str(_write(w / "d.txt", "<x_1>\n<x_1>\n"))],
        ["<x_1>", "more than once"],
    ),
    "description init without descriptions": (
        lambda t, w, s: [
            "--tokens",
            str(_tokens(w, [{"token": "<x_1>", "description": "  "}])),
            "--init",
            "description",
        ],
        ["description"],
    ),
    "description init, description key missing": (
        lambda t, w, s: [
            "--tokens",
            str(_tokens(w, [{"token": "<x_1>"}])),
            "--init",
            "description",
        ],
        ["description"],
    ),
    "config disagrees with the tensors": (
        lambda t, w, s: ["--model", str(_wrong_hidden_size(t, w))],
        ["hidden_size"],
    ),
    "truncated safetensors": (
        lambda t, w, s: ["--model", str(_truncated_model(t, w))],
        ["model.safetensors", "truncated"],
    ),
    "would shrink the vocabulary": (
        lambda t, w, s: ["--model", str(s)],
        ["375", "300"],
    ),
    "out under a file": (
        lambda t, w, s: ["--out", str(_a_file(w) / "out")],
        ["a_file"],
    ),
    "out exists": (lambda t, w, s: ["--out", str(w)], ["already exists"]),
    "out parent missing": (lambda t, w, s: ["--out", str(w / "x" / "y")], ["does not exist"]),
    "unknown initializer": (
        lambda t, w, s: ["--init", "zeros"],
        ["zeros", "mean", "unknown initializer"],
    ),
    "bad init arg": (
        lambda t, w, s: ["--init", "normal", "--init-arg", "sdt=1"],
        ["bad arguments"],
    ),
    "init arg format": (lambda t, w, s: ["--init-arg", "std"], ["NAME=VALUE"]),
    "bad padding": (lambda t, w, s: ["--pad-to-multiple-of", "0"], ["pad-to-multiple-of"]),
}


@pytest.mark.parametrize("case", list(EXTEND))
def test_extend_bad_input(task, short_model, tmp_path, capsys, case):
    make, needles = EXTEND[case]
    work = tmp_path / "work"
    work.mkdir()
    good = _tokens(
        tmp_path, [{"token": t, "description": f"thing {t}"} for t in TOKENS], "ok.jsonl"
    )
    out = tmp_path / "out"
    args = {"--model": str(task.model), "--tokens": str(good), "--out": str(out)}
    extra = make(task, work, short_model)
    rest = []
    for i in range(0, len(extra), 2):
        if extra[i] in args:
            args[extra[i]] = extra[i + 1]
        else:
            rest += extra[i : i + 2]
    before = sorted(p.name for p in tmp_path.iterdir()), sorted(p.name for p in work.iterdir())
    out_existed = Path(args["--out"]).exists()  # "out exists" gives an existing directory
    rc = extend.main([x for kv in args.items() for x in kv] + rest)
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    _check_one_error_line(err, needles)
    assert len(err.strip().splitlines()) == 1, err  # the error line is all of stderr
    assert not out.exists() and Path(args["--out"]).exists() == out_existed
    after = sorted(p.name for p in tmp_path.iterdir()), sorted(p.name for p in work.iterdir())
    assert after == before


# --------------------------------------------------------------------------------------------
# Two real subprocesses: the exit code and stderr of the installed entry points.
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # a subprocess
def test_train_subprocess_bad_token_file(task, tmp_path):
    bad = _write(tmp_path / "bad.jsonl", "{oops\n")
    run_dir = tmp_path / "run"
    r = subprocess.run(
        train_command(*task.args, f"data.tokens={bad}", f"run_dir={run_dir}"),
        capture_output=True,
        text=True,
        env=train_env(),
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    _check_one_error_line(r.stderr, ["bad.jsonl:1"])
    assert not run_dir.exists()


@pytest.mark.slow  # a subprocess
def test_extend_subprocess_would_shrink(task, short_model, tmp_path):
    out = tmp_path / "out"
    tokens = _tokens(tmp_path, [{"token": "<x_1>"}])
    r = subprocess.run(
        [
            *train_command()[:2],
            "gti_jax.extend",
            "--model",
            str(short_model),
            "--tokens",
            str(tokens),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=train_env(),
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    _check_one_error_line(r.stderr, ["375", "300"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.jsonl"]  # no --out, no temp
