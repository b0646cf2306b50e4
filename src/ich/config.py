"""Load, merge, validate and save the one YAML config.

In: the packaged ich/configs/base.yaml (every key and its default), an experiment YAML that
overrides some keys (a path, or the name of a packaged config: `demo`, `rsna`), and
`section.key=value` overrides from the command line. Out: a plain nested dict whose keys are
exactly those of base.yaml, every value checked against its type and range (ich.schema, pydantic):
steps read cfg["train"]["batch_size"] and never see pydantic.

Adding a key: its default and a comment in base.yaml, its type and range in ich.schema.
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ich.data.inputs import InputSpec

class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


# The packaged configs (ich/configs/<name>.yaml): base.yaml is the schema, the others examples.
BASE = "base"


def packaged_dir() -> Path:
    """Folder of the packaged configs (src/ich/configs in a source checkout)."""
    return Path(str(resources.files("ich") / "configs"))


def base_path() -> Path:
    """Path of the packaged base.yaml: every key and its default."""
    return packaged_dir() / f"{BASE}.yaml"


def packaged_names() -> list[str]:
    """Names of the packaged example configs that `--config NAME` accepts (base excluded)."""
    return sorted(p.stem for p in packaged_dir().glob("*.yaml") if p.stem != BASE)


def resolve_path(name: str | Path) -> Path:
    """A config argument as a file: an existing path wins, else a packaged name (`demo`, `demo.yaml`).

    Raises ConfigError naming the packaged configs when it is neither.
    """
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    # Only a bare name may mean a packaged config: `runs/x/demo.yaml` that is missing stays an error.
    if path.parent == Path(".") and stem in packaged_names():
        return packaged_dir() / f"{stem}.yaml"
    raise ConfigError(f"config file {path} not found; give a path to a YAML file or one of the "
                      f"packaged configs: {', '.join(packaged_names())}")


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Return base.yaml merged with the experiment config `path` and `key=value` overrides.

    `path` is a YAML file or the name of a packaged config (see resolve_path); None means the
    defaults alone.
    """
    cfg = _read_yaml(base_path())
    if path is not None:
        experiment = _read_yaml(resolve_path(path))
        _merge(cfg, experiment, source=str(path), prefix="")
    for item in overrides:
        key, value = parse_override(item)
        set_key(cfg, key, value, source="--set")
    return validate(cfg)


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
    """Set `a.b.c` in cfg; an unknown key raises ConfigError listing the valid ones.

    Types and ranges are checked afterwards, by validate(), on the whole config.
    """
    parts = dotted.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:depth]) or "top level"
            valid = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
            raise ConfigError(f"{source}: unknown key {dotted!r} (at {where}); valid keys: {valid}")
        if depth == len(parts) - 1:
            if _is_section(node[part], dotted):
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: {dotted!r} is a section; give it a mapping, not {value!r}")
                _merge(node[part], value, source, prefix=f"{dotted}.")
            else:
                node[part] = copy.deepcopy(value)
        else:
            node = node[part]


def validate(cfg: dict) -> dict:
    """Check every key's type and range (ich.schema); return the validated plain dict.

    Raises ConfigError naming each key at fault, its value and what is allowed.
    """
    from pydantic import ValidationError

    from ich.schema import Config

    try:
        model = Config.model_validate(cfg)
    except ValidationError as err:
        raise ConfigError(_describe(err, cfg)) from None
    plain = model.model_dump(by_alias=True)
    try:
        InputSpec.from_config(plain)  # offsets and slice channels against the windows
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return plain


def json_schema() -> dict:
    """The config's JSON Schema, each key with its base.yaml default and comment (for editors)."""
    from ich.schema import Config

    schema = Config.model_json_schema(by_alias=True)
    schema["title"] = "ich config"
    schema["description"] = ("An ich experiment config: every key optional, overriding "
                             "ich/configs/base.yaml (the defaults shown).")
    schema.pop("required", None)
    base = _read_yaml(base_path())
    comments = base_comments()
    defs = schema.get("$defs", {})

    def annotate(node: dict, values: dict, prefix: str) -> None:
        node.pop("required", None)  # an experiment config overrides only some keys
        for key, prop in node.get("properties", {}).items():
            dotted = f"{prefix}{key}"
            if dotted in comments:
                prop["description"] = comments[dotted]
            ref = prop.get("$ref")
            if ref and isinstance(values.get(key), dict):
                annotate(defs[ref.rsplit("/", 1)[-1]], values[key], f"{dotted}.")
            elif key in values:
                prop["default"] = values[key]

    annotate(schema, base, "")
    return schema


def base_comments() -> dict[str, str]:
    """{"train.batch_size": "images per step", ...}: the trailing comment of each base.yaml key."""
    comments, stack = {}, []
    for line in base_path().read_text().splitlines():
        match = re.match(r"^( *)([A-Za-z_][\w]*):(.*?)(?:\s+#\s*(.*))?$", line)
        if not match:
            continue
        indent, key, _, comment = match.groups()
        depth = len(indent) // 2
        stack = stack[:depth] + [key]
        if comment:
            comments[".".join(stack)] = comment.strip()
    return comments


def _describe(err, cfg: dict) -> str:
    """One line per bad key: `key: value is not allowed: what is allowed`."""
    problems: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    for item in err.errors(include_url=False):
        # The location runs through the config, then (for unions) names the member types.
        node, keys = cfg, []
        for part in item["loc"]:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                break
            keys.append(str(part))
        key = ".".join(keys) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "missing"
        values.setdefault(key, node)
        if message not in problems.setdefault(key, []):
            problems[key].append(message)
    lines = []
    for key, messages in problems.items():
        if "Input should be a valid number" in messages:
            # int | float: "a valid number" says it all
            messages = [m for m in messages if m != "Input should be a valid integer"]
        if len(messages) == 1 and messages[0].startswith((f"{key}:", f"{key}.")):
            lines.append(messages[0])  # a check that already names the key and the fix
        else:
            lines.append(f"{key}: {values[key]!r} is not allowed: {'; or '.join(messages)}")
    if len(lines) == 1:
        return lines[0]
    return f"{len(lines)} config errors:\n  " + "\n  ".join(lines)


def get(cfg: dict, dotted: str) -> Any:
    """Value at `a.b.c`."""
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def dump(cfg: dict) -> str:
    """The config as YAML text, keys in base.yaml's order."""
    return yaml.safe_dump(cfg, sort_keys=False)


def write_starter(path: Path, force: bool = False) -> Path:
    """Write a starter experiment config: base.yaml's keys, defaults and comments, to edit.

    Refuses to overwrite an existing file unless force (ConfigError naming the file).
    """
    from ich import __version__
    from ich.io import atomic_write_text

    if path.exists() and not force:
        raise ConfigError(f"{path} exists; choose another path or pass --force to overwrite it")
    header = (f"# Starter config written by ich {__version__} (`ich config init`): every key with its\n"
              f"# default. Change what you need and delete the rest; run `ich run --config {path}`.\n\n")
    body = base_path().read_text().split("\n\n", 1)[1]  # base.yaml's own header is about base.yaml
    return atomic_write_text(path, header + body)


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
        if _is_section(cfg[key], dotted):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted!r} is a section; give it a mapping, not {value!r}")
            _merge(cfg[key], value, source, prefix=f"{dotted}.")
        else:
            cfg[key] = copy.deepcopy(value)


# Mappings that are values, replaced whole, not sections of fixed keys: users name their windows.
OPEN_TABLES = ("preprocess.windows",)


def _is_section(default: Any, dotted: str) -> bool:
    return isinstance(default, dict) and dotted not in OPEN_TABLES
