"""Load, merge, validate and save the one YAML config.

In: configs/base.yaml (every key and its default), an experiment YAML that overrides some keys,
and `section.key=value` overrides from the command line. Out: a nested dict whose keys are
exactly those of base.yaml, with values type-checked against the defaults.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# Keys whose value must be one of a fixed set: a typo should fail at load, not mid-training.
CHOICES = {
    "index.pool": ("process", "thread"),
    "sample.unit": ("image", "series"),
    "copy.mode": ("copy", "hardlink", "symlink"),
    "online_augment.flip": ("horizontal", "vertical", "horizontal_and_vertical", "none"),
    "data.cache": ("packed", "png"),
    "train.backend": ("auto", "torch", "jax", "tensorflow"),
    "train.mixed_precision": ("auto", True, False),
    "train.jit_compile": ("auto", True, False),
    "train.class_weight": ("balanced", "none"),
    "train.pos_weight": ("balanced", "none"),
    "evaluate.threshold_method": ("youden", "f1"),
}
# Keys that take "auto" or a positive int.
AUTO_INT = ("index.workers", "preprocess.workers", "augment.workers", "data.workers", "predict.workers")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


def base_path() -> Path:
    """Path of the packaged base.yaml (configs/base.yaml in a source checkout)."""
    return Path(str(resources.files("ich") / "base.yaml"))


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Return base.yaml merged with the experiment file at `path` and `key=value` overrides."""
    cfg = _read_yaml(base_path())
    if path is not None:
        experiment = _read_yaml(Path(path))
        _merge(cfg, experiment, source=str(path), prefix="")
    for item in overrides:
        key, value = parse_override(item)
        set_key(cfg, key, value, source="--set")
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """Split `section.key=value` and parse the value as YAML (so 3, 0.1, true, [a, b] work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.batch_size=16")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({err})") from err
    return key.strip(), value


def set_key(cfg: dict, dotted: str, value: Any, source: str = "--set") -> None:
    """Set `a.b.c` in cfg; an unknown key raises ConfigError listing the valid ones."""
    parts = dotted.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:depth]) or "top level"
            valid = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
            raise ConfigError(f"{source}: unknown key {dotted!r} (at {where}); valid keys: {valid}")
        if depth == len(parts) - 1:
            node[part] = _coerce(node[part], value, dotted, source)
        else:
            node = node[part]


def validate(cfg: dict) -> None:
    """Check enumerations and numeric ranges that types alone cannot express."""
    for key, allowed in CHOICES.items():
        value = get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
    for key in AUTO_INT:
        value = get(cfg, key)
        if value != "auto" and not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"{key}: {value!r} must be 'auto' or a positive integer")
    fractions = cfg["split"]["fractions"]
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"split.fractions: {fractions} must be three non-negative numbers summing to 1")
    windows = cfg["preprocess"]["windows"]
    for name, pair in windows.items():
        if not (isinstance(pair, list) and len(pair) == 2 and pair[1] > 0):
            raise ConfigError(f"preprocess.windows.{name}: {pair!r} must be [center, width] with width > 0")
    for name in cfg["preprocess"]["channels"]:
        if name not in windows:
            raise ConfigError(
                f"preprocess.channels: unknown window {name!r}; defined windows: {sorted(windows)}")
    if len(cfg["preprocess"]["channels"]) != 3:
        raise ConfigError("preprocess.channels: exactly three window names (red, green, blue)")
    for section in ("augment", "online_augment"):
        for key, value in cfg[section].items():
            # Probabilities (`*_p`) and the elastic strength are fractions.
            if (key.endswith("_p") or key == "elastic_scale") and not 0 <= value <= 1:
                raise ConfigError(f"{section}.{key}: {value!r} must lie in [0, 1]")
    context = cfg["sample"]["context"]
    if not all(isinstance(o, int) and not isinstance(o, bool) and o != 0 for o in context):
        raise ConfigError(f"sample.context: {context!r} must be a list of non-zero slice offsets, e.g. [-1, 1]")
    for key in ("index.chunk_size", "sample.per_label", "preprocess.image_size", "model.image_size", "train.batch_size"):
        if get(cfg, key) < 1:
            raise ConfigError(f"{key}: must be at least 1, got {get(cfg, key)}")


def get(cfg: dict, dotted: str) -> Any:
    """Value at `a.b.c`."""
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def save(cfg: dict, path: Path) -> Path:
    """Write the resolved config as YAML (atomically) so every output records how it was made."""
    from ich.io import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))


def resolve_workers(value: str | int) -> int:
    """'auto' -> the number of usable cores; an int passes through."""
    import os

    if value == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # macOS has no sched_getaffinity
            return os.cpu_count() or 1
    return int(value)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _merge(cfg: dict, override: dict, source: str, prefix: str) -> None:
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if key not in cfg:
            valid = ", ".join(sorted(cfg))
            raise ConfigError(f"{source}: unknown key {dotted!r}; valid keys here: {valid}")
        # Named-window tables are open: users may define their own windows.
        if isinstance(cfg[key], dict) and dotted != "preprocess.windows":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted!r} is a section; give it a mapping, not {value!r}")
            _merge(cfg[key], value, source, prefix=f"{dotted}.")
        else:
            cfg[key] = _coerce(cfg[key], value, dotted, source)


def _coerce(default: Any, value: Any, key: str, source: str) -> Any:
    """Accept `value` where it fits the type of `default`; None defaults accept anything."""
    if default is None or value is None:
        return copy.deepcopy(value)
    if isinstance(default, bool) or isinstance(value, bool):
        if key in CHOICES or isinstance(default, bool) == isinstance(value, bool):
            return value
    elif isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return float(value) if isinstance(default, float) else value
    elif isinstance(default, str) and (isinstance(value, str) or key in CHOICES or key in AUTO_INT):
        return value
    elif isinstance(default, list) and isinstance(value, list):
        return copy.deepcopy(value)
    elif isinstance(default, dict) and isinstance(value, dict):
        return copy.deepcopy(value)
    raise ConfigError(
        f"{source}: {key} = {value!r} has type {type(value).__name__}; "
        f"expected {type(default).__name__} like the default {default!r}")
