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
    for line in config.base_path().read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in stripped, f"base.yaml line without a comment: {line!r}"


@pytest.mark.parametrize("name", ["demo", "rsna"])
def test_shipped_configs_load(name):
    assert name in config.packaged_names()
    cfg = config.load(name)
    assert cfg["paths"]["work_dir"] == f"work/{name}"
    # The same file by path and by name with its suffix.
    assert config.load(config.packaged_dir() / f"{name}.yaml") == cfg == config.load(f"{name}.yaml")


def test_config_path_wins_over_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("demo.yaml").write_text("seed: 5\n")
    assert config.load("demo")["seed"] != 5       # a bare name without suffix: packaged
    assert config.load("demo.yaml")["seed"] == 5  # an existing file: the file
    with pytest.raises(config.ConfigError, match=r"nope.yaml not found.*packaged configs: demo, quality, rsna"):
        config.load("nope.yaml")


def test_packaged_configs_are_real_files():
    # A symlink would not survive a wheel; every packaged config is a plain file.
    for path in config.packaged_dir().glob("*.yaml"):
        assert path.is_file() and not path.is_symlink(), path


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
    with pytest.raises(config.ConfigError, match=r"per_lable.*valid keys here: context, exclude_ids, per_label, unit"):
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
    with pytest.raises(config.ConfigError, match=r"is not allowed: Input should be (less|greater) than or equal to [01]"):
        config.load(None, [override])


# One case per class of error the typed config refuses at load (ich.schema), each naming the
# key, the value and what is allowed.
@pytest.mark.parametrize("override, message", [
    # a range on an int
    ("copy.workers=0", r"copy.workers: 0 is not allowed: Input should be greater than or equal to 1"),
    # a float where a count is needed
    ("sample.per_label=2.5", r"sample.per_label: 2.5 is not allowed: Input should be a valid integer"),
    # a range on a float
    ("train.frozen_lr=-1", r"train.frozen_lr: -1 is not allowed: Input should be greater than 0"),
    ("train.lr_factor=5", r"train.lr_factor: 5 is not allowed: Input should be less than 1"),
    # a number where a name (or null) is needed
    ("model.weights=5", r"model.weights: 5 is not allowed: Input should be a valid string"),
    ("preprocess.image_size=255.5", r"preprocess.image_size: 255.5 is not allowed: Input should be a valid integer"),
    # a string where an optional int is needed (used to crash after stage 1 had trained)
    ("train.stage2_finetune_epochs=abc",
     r"train.stage2_finetune_epochs: 'abc' is not allowed: Input should be a valid integer"),
    # an empty split (used to fail in evaluate, after training)
    ("split.fractions=[0.8,0.2,0]", r"split.fractions.2: 0 is not allowed: every split fraction must lie strictly between 0 and 1"),
    # a string inside a list of numbers (used to be a raw TypeError)
    ("split.fractions=[0.8,a,0.1]", r"split.fractions.1: 'a' is not allowed: Input should be a valid number"),
    # a union: "auto" or a positive int
    ("data.workers=0", r"data.workers: 0 is not allowed: Input should be 'auto'; or Input should be greater than or equal to 1"),
    # a bool is not an int (strict types)
    ("train.batch_size=true", r"train.batch_size: True is not allowed: Input should be a valid integer"),
    # a cross-key rule
    ("preprocess.channels=[blood, brain, skin]", r"preprocess.channels: unknown window\(s\) \['skin'\]"),
])
def test_typed_config_refuses_at_load(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, [override])


def test_several_errors_are_listed_together(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("copy:\n  workers: 0\ntrain:\n  lr_factor: 5\n")
    with pytest.raises(config.ConfigError, match=r"2 config errors:\n  copy.workers: 0 .*\n  train.lr_factor: 5"):
        config.load(exp)


def test_cli_exit_status_2_on_a_bad_value(capsys):
    from ich import cli

    assert cli.main(["config", "show", "--set", "copy.workers=0"]) == 2


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, dict) and prefix + key not in config.OPEN_TABLES:
            out |= _keys(value, f"{prefix}{key}.")
    return out


def _schema_keys(model, prefix: str = "") -> set[str]:
    from pydantic import BaseModel

    out = set()
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        out.add(key)
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out |= _schema_keys(kind, f"{key}.")
    return out


def test_schema_and_base_yaml_agree():
    from ich.schema import Config

    raw = yaml.safe_load(config.base_path().read_text())
    # Same keys, both ways: a key added to one file only is caught here.
    assert _keys(raw) == _schema_keys(Config)
    # base.yaml's defaults pass the schema unchanged (types agree: no int turned float, ...).
    resolved = config.load()
    assert resolved == raw and list(resolved) == list(raw)
    assert isinstance(resolved["preprocess"]["windows"]["blood"][0], int)
    # The schema carries no defaults of its own: base.yaml is the one file of defaults.
    assert all(field.is_required() for field in Config.model_fields.values())


def test_json_schema_has_base_defaults_and_comments():
    schema = config.json_schema()
    train = schema["$defs"]["Train"]["properties"]
    assert train["batch_size"]["default"] == 32
    assert train["batch_size"]["description"] == "images per step"
    assert train["batch_size"]["minimum"] == 1
    assert "required" not in schema["$defs"]["Train"]  # an experiment file sets only some keys
    assert set(schema["properties"]) == set(config.load())


def test_starter_config_loads_and_is_not_overwritten(tmp_path):
    path = config.write_starter(tmp_path / "mine.yaml")
    assert config.load(path) == config.load()
    assert "batch_size: 32             # images per step" in path.read_text()
    with pytest.raises(config.ConfigError, match="exists"):
        config.write_starter(path)
