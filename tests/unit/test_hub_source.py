"""Hub ids (``Org/Name[@revision]``) resolved through a Hugging Face cache built by hand,
offline: ``load_pretrained``, ``gti_jax.extend --model`` and the trainer's model check."""

import json

import jax
import numpy as np
import pytest

from gti_jax import extend, models
from gti_jax.models.source import ModelSourceError, resolve_source
from tests.helpers.hf_models import make_tiny_hf_model
from tests.helpers.hub_cache import add_to_hub_cache


@pytest.fixture(scope="module")
def two_revisions(tmp_path_factory):
    """Two tiny Qwen3 checkpoints (weights of seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("hub_models")
    return make_tiny_hf_model(root, "qwen3", seed=0), make_tiny_hf_model(root, "qwen3", seed=1)


@pytest.fixture
def hub(tmp_path, monkeypatch, two_revisions):
    """An offline Hub cache under HF_HOME=tmp_path: Org/Tiny with main -> seed 0 and the
    branch v2 -> seed 1. Returns the two commits."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf" / "hub"
    main = add_to_hub_cache(cache, "Org/Tiny", two_revisions[0], branch="main")
    v2 = add_to_hub_cache(cache, "Org/Tiny", two_revisions[1], branch="v2")
    return main, v2


def _params(model):
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_params(a), _params(b), strict=True))


def test_hub_id_loads_the_cached_snapshot_like_the_directory(hub, two_revisions):
    main, v2 = hub
    source = resolve_source("Org/Tiny")
    assert source.kind == "hf" and source.path.name == main
    assert resolve_source("Org/Tiny@v2").path.name == v2
    assert resolve_source(f"Org/Tiny@{v2}").path.name == v2  # a commit hash is a revision
    from_hub, tok = models.load_pretrained("Org/Tiny")
    from_dir, tok_dir = models.load_pretrained(two_revisions[0])
    # the same files behind symlinks: bit for bit the same parameters and tokenizer
    assert _same(from_hub, from_dir)
    assert tok.encode("a red apple") == tok_dir.encode("a red apple")
    other, _ = models.load_pretrained("Org/Tiny@v2")
    assert not _same(other, from_dir)
    assert _same(other, models.load_pretrained(two_revisions[1])[0])


def test_hf_hub_cache_wins_over_hf_home(hub, tmp_path, monkeypatch, two_revisions):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(ModelSourceError):
        resolve_source("Org/Tiny")
    commit = add_to_hub_cache(tmp_path / "elsewhere", "Org/Tiny", two_revisions[1], branch="main")
    assert resolve_source("Org/Tiny").path.name == commit


@pytest.mark.parametrize("name", ["Org/Missing", "Org/Tiny@no-such-branch"])
def test_offline_and_not_cached_is_one_line_with_the_fix(hub, name):
    with pytest.raises(ModelSourceError) as e:
        resolve_source(name, label=f"model={name}")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model={name}: ")
    assert "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    assert f"hf download {name.split('@')[0]}" in msg and "huggingface-cli download" in msg


def test_a_local_directory_wins_over_a_hub_id(hub, tmp_path, monkeypatch, two_revisions):
    (tmp_path / "Org").mkdir()
    (tmp_path / "Org" / "Tiny").symlink_to(two_revisions[1], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_source("Org/Tiny").path == tmp_path.joinpath("Org", "Tiny").relative_to(tmp_path)


def test_trainer_model_check_and_extend_take_hub_ids(hub, tmp_path, capsys):
    from gti_jax.train.run import TrainError, _check_model

    _check_model("Org/Tiny@v2")
    with pytest.raises(TrainError, match=r"^model=Org/Gone: .*HF_HUB_OFFLINE"):
        _check_model("Org/Gone")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("<x_0>\n<x_1>\n")
    out = tmp_path / "extended"
    assert extend.main(["--model", "Org/Tiny", "--tokens", str(tokens), "--out", str(out)]) == 0
    summary = json.loads((out / "gti_extend.json").read_text())
    assert (
        summary["model"] == "Org/Tiny" and summary["num_tokens"] == summary["base_num_tokens"] + 2
    )
    assert (
        extend.main(["--model", "Org/Gone", "--tokens", str(tokens), "--out", str(out) + "2"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --model Org/Gone: ") and "HF_HUB_OFFLINE" in err[-1]
    assert not (tmp_path / "extended2").exists()


def test_online_and_not_cached_downloads_through_snapshot_download(
    hub, tmp_path, monkeypatch, two_revisions
):
    """Not offline, a model missing from the cache goes to ``snapshot_download`` (which in
    real use downloads; here a stand-in for the network fills the cache or fails), asking
    only for the files a model needs, never pickles."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    real, calls = huggingface_hub.snapshot_download, []

    def network(repo_id, **kw):
        if kw.get("local_files_only"):
            return real(repo_id, **kw)  # the cache, as it is
        calls.append((repo_id, kw))
        if repo_id == "Org/Unreachable":
            raise OSError("Network is unreachable")
        add_to_hub_cache(kw["cache_dir"], repo_id, two_revisions[1], branch="main")
        return real(repo_id, **{**kw, "local_files_only": True})

    monkeypatch.setattr(huggingface_hub, "snapshot_download", network)
    assert resolve_source("Org/Tiny").path.name == hub[0]  # cached: no download
    assert calls == []
    assert (resolve_source("Org/New").path / "config.json").is_file()
    ((repo, kw),) = calls
    assert repo == "Org/New" and kw["revision"] is None
    assert "*.safetensors" in kw["allow_patterns"] and not any(
        p.endswith((".bin", ".pt", ".pth")) for p in kw["allow_patterns"]
    )
    with pytest.raises(ModelSourceError) as e:
        resolve_source("Org/Unreachable@v1", label="model=Org/Unreachable@v1")
    assert str(e.value) == (
        "model=Org/Unreachable@v1: no such local directory, and the Hub model "
        "Org/Unreachable@v1 could not be downloaded (OSError: Network is unreachable); check "
        "the id and the network, or give a local checkpoint directory"
    )
