"""configs/quickstart.yaml documents the embedded default: the two must not drift apart."""

from pathlib import Path

from gti_jax.pipeline import config_to_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_yaml_equals_the_defaults():
    assert config_to_dict(
        load_config(str(REPO / "configs" / "quickstart.yaml"), [])
    ) == config_to_dict(load_config(None, []))


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(str(path), [])
