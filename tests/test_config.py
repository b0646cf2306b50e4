"""Config loading: base defaults, experiment overrides, --set, validation errors."""

from pathlib import Path

import pytest
import yaml

from ich import config

REPO = Path(__file__).resolve().parents[1]


def test_base_has_every_section_and_comments():
    cfg = config.load()
    assert set(cfg) >= {"seed", "paths", "sample", "copy", "preprocess", "split", "train"}
    assert cfg["preprocess"]["windows"]["blood"] == [80, 200]
    # Every key line of base.yaml carries a trailing comment explaining it.
    for line in (REPO / "configs" / "base.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in stripped, f"base.yaml line without a comment: {line!r}"


@pytest.mark.parametrize("name", ["demo.yaml", "rsna.yaml"])
def test_shipped_configs_load(name):
    cfg = config.load(REPO / "configs" / name)
    assert cfg["paths"]["work_dir"]


def test_experiment_and_set_override(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"sample": {"per_label": 7}, "paths": {"work_dir": "w"}}))
    cfg = config.load(exp, ["train.batch_size=8", "split.fractions=[0.6, 0.2, 0.2]", "seed=3"])
    assert cfg["sample"]["per_label"] == 7
    assert cfg["paths"]["work_dir"] == "w"
    assert cfg["train"]["batch_size"] == 8
    assert cfg["split"]["fractions"] == [0.6, 0.2, 0.2]
    assert cfg["seed"] == 3
    assert cfg["train"]["frozen_lr"] == 0.001  # untouched default


def test_int_to_float_coercion():
    cfg = config.load(None, ["train.frozen_lr=1"])
    assert cfg["train"]["frozen_lr"] == 1.0 and isinstance(cfg["train"]["frozen_lr"], float)


def test_unknown_key_names_it_and_valid_keys(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("sample:\n  per_lable: 5\n")
    with pytest.raises(config.ConfigError, match=r"per_lable.*valid keys here: exclude_ids, per_label"):
        config.load(exp)
    with pytest.raises(config.ConfigError, match=r"unknown key 'train.bach_size'.*batch_size"):
        config.load(None, ["train.bach_size=3"])


@pytest.mark.parametrize("override, message", [
    ("copy.mode=move", "copy.mode"),
    ("train.batch_size=abc", "train.batch_size"),
    ("split.fractions=[0.5, 0.2, 0.2]", "split.fractions"),
    ("preprocess.channels=[blood, brain, skin]", "skin"),
    ("preprocess.workers=0", "preprocess.workers"),
    ("sample=3", "sample"),
])
def test_invalid_values_are_rejected(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, [override])


def test_workers_auto_and_int():
    assert config.resolve_workers("auto") >= 1
    assert config.resolve_workers(3) == 3
    assert config.load(None, ["preprocess.workers=2"])["preprocess"]["workers"] == 2


def test_custom_window_allowed():
    cfg = config.load(None, ["preprocess.windows={blood: [80, 200], brain: [40, 80], bone: [600, 2800], soft: [40, 380]}",
                             "preprocess.channels=[blood, brain, soft]"])
    assert cfg["preprocess"]["windows"]["soft"] == [40, 380]


def test_save_roundtrip(tmp_path):
    cfg = config.load(None, ["seed=9"])
    path = config.save(cfg, tmp_path / "resolved.yaml")
    assert yaml.safe_load(path.read_text()) == cfg


@pytest.mark.parametrize("override", ["augment.blur_p=1.5", "online_augment.elastic_p=-0.1"])
def test_probabilities_must_be_fractions(override):
    with pytest.raises(config.ConfigError, match=r"must lie in \[0, 1\]"):
        config.load(None, [override])
