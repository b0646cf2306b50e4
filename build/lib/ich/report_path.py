"""`python -m ich.report_path --config FILE [--set k=v ...]`: where the evaluation report is.

Prints the absolute path of run_dir/eval/report.md and the test ROC AUC of `any` from
run_dir/eval/metrics.json, the last lines `make demo` shows:

    Report: /abs/path/runs/demo/eval/report.md
    Test AUC (any): 0.953

Exits 2 with a message on stderr when the evaluation has not been run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ich import config
from ich.constants import EVAL_DIR, METRICS_JSON, REPORT_MD


def report_lines(cfg: dict) -> str:
    """The two lines for the run of `cfg`; FileNotFoundError when report or metrics are missing."""
    eval_dir = Path(cfg["paths"]["run_dir"]) / EVAL_DIR
    report, metrics_path = eval_dir / REPORT_MD, eval_dir / METRICS_JSON
    for path in (report, metrics_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; run `ich evaluate --config ...` first")
    auc = json.loads(metrics_path.read_text())["labels"]["any"]["roc_auc"]
    shown = "n/a (only one class in the test split)" if auc is None else f"{auc:.3f}"
    return f"Report: {report.resolve()}\nTest AUC (any): {shown}"


def main(argv: list[str] | None = None) -> int:
    """Print the report path and test AUC; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m ich.report_path", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="experiment YAML (overrides configs/base.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        print(report_lines(config.load(args.config, args.set)))
    except (config.ConfigError, FileNotFoundError, KeyError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
