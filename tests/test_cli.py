"""CLI conventions: --version, help on every option, -v, --log-file with timestamps, exit codes,
the `config` subcommands, commands without --config."""

import argparse
import json
import re

import pytest
import yaml

import ich
from ich import cli, config


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"ich {ich.__version__}"


def test_every_option_has_help():
    missing = [f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
               for parser in _parsers(cli._build_parser()) for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert missing == []


def test_config_show_without_config_is_the_defaults(capsys):
    assert cli.main(["config", "show", "--set", "seed=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == config.load(None, ["seed=7"])


def test_config_show_packaged_name(capsys):
    assert cli.main(["config", "show", "--config", "demo"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["paths"]["run_dir"] == "runs/demo"


def test_config_init_and_schema(tmp_path, capsys):
    target = tmp_path / "mine.yaml"
    assert cli.main(["config", "init", str(target)]) == 0
    assert config.load(target) == config.load()
    assert cli.main(["config", "init", str(target)]) == 2      # exists: refused
    assert cli.main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["properties"]["seed"]["default"] == 42


def test_bad_config_exits_2_and_names_the_key(tmp_path):
    log_file = tmp_path / "ich.log"
    assert cli.main(["--log-file", str(log_file), "config", "show", "--set", "sample.per_label=2.5"]) == 2
    text = log_file.read_text()
    assert "sample.per_label: 2.5 is not allowed" in text
    # Timestamps and levels in the file.
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ERROR ich: error: ", text)


def test_verbose_shows_debug_and_log_file_is_not_duplicated(tmp_path):
    log_file = tmp_path / "ich.log"
    cli.setup_logging(verbose=True, log_file=str(log_file))
    cli.setup_logging(verbose=True, log_file=str(log_file))   # a second main() in one process
    cli.log.debug("a debug line")
    assert log_file.read_text().count("DEBUG ich: a debug line") == 1
    cli.setup_logging()
    assert cli.log.level == 20  # INFO again, and the file handler is gone
    assert not [h for h in cli.log.handlers if getattr(h, "_ich_log_file", False)]


def test_run_dry_run_names_what_would_run_and_why(tmp_path, capsys):
    from ich.cli import main
    from ich.synth import generate

    data = generate(tmp_path / "d", patients=4, slices=4, seed=0, workers=1, size=64)
    sets = ["--set", f"paths.labels_csv={data / 'stage_2_train.csv'}",
            "--set", f"paths.dicom_dir={data / 'stage_2_train'}",
            "--set", f"paths.work_dir={tmp_path / 'work'}", "--set", "preprocess.image_size=64"]
    assert main(["run", "--to", "sample", "--dry-run", *sets]) == 0
    out = capsys.readouterr().out
    assert "index       would run: never run" in out and "sample      would run" in out
    assert not (tmp_path / "work" / "sampled.csv").exists()          # nothing ran
    assert main(["run", "--to", "sample", *sets]) == 0
    capsys.readouterr()
    assert main(["run", "--to", "sample", "--dry-run", *sets]) == 0
    assert capsys.readouterr().out.splitlines() == ["index       up to date", "sample      up to date"]
    assert main(["run", "--to", "sample", "--dry-run", *sets, "--set", "sample.per_label=3"]) == 0
    assert "sample      would run: settings changed: sample.per_label" in capsys.readouterr().out
