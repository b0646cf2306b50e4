"""Benchmark: what the cascade learns on the synthetic phantom set, and how long training takes.

Generates `ich synth` data (60 patients x 24 slices, seed 0) unless present, runs the pipeline
with bench/quality.yaml (data steps, then train and evaluate from scratch, each timed), and
prints test AUCs next to the goals: AUC(any) >= 0.95 and mean subtype AUC >= 0.90, with
training within 20 minutes on 2 CPU cores. Exit status 0 when every goal is met, 1 otherwise.

    .venv/bin/python bench/quality.py [--config bench/quality.yaml] [--keep]

The AUCs are those of evaluate's metrics.json on the test split (patients never seen in
training): subtype probabilities are the cascade's p(any) * p(subtype | any).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOALS = {"any": 0.95, "subtypes": 0.90, "train_minutes": 20.0}
SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")


def ich(*args: str) -> float:
    """Run one `ich` command from the repo root (output shown live); return its seconds."""
    exe = Path(sys.executable).with_name("ich")
    start = time.perf_counter()
    subprocess.run([str(exe), *args], cwd=REPO, check=True,
                   env=dict(os.environ, KERAS_BACKEND=os.environ.get("KERAS_BACKEND", "torch")))
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "bench" / "quality.yaml"))
    parser.add_argument("--keep", action="store_true",
                        help="keep an existing run_dir (default: delete it so train and evaluate are measured afresh)")
    args = parser.parse_args(argv)

    from ich import config as config_mod

    cfg = config_mod.load(args.config)
    data_dir = (REPO / cfg["paths"]["labels_csv"]).parent
    run_dir = REPO / cfg["paths"]["run_dir"]
    seconds = {}
    if not (REPO / cfg["paths"]["labels_csv"]).is_file():
        seconds["synth"] = ich("synth", str(data_dir), "--patients", "60", "--slices", "24", "--seed", "0")
    if run_dir.exists() and not args.keep:
        shutil.rmtree(run_dir)
    seconds["data steps"] = ich("run", "--config", args.config, "--to", "augment")
    seconds["train"] = ich("train", "--config", args.config)
    seconds["evaluate"] = ich("evaluate", "--config", args.config)

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    labels = metrics["labels"]
    any_auc = labels["any"]["roc_auc"]
    sub_aucs = [labels[s]["roc_auc"] for s in SUBTYPES if labels[s]["roc_auc"] is not None]
    mean_sub = sum(sub_aucs) / len(sub_aucs) if sub_aucs else float("nan")
    train_min = seconds["train"] / 60

    print(f"\nbench/quality.py  config {args.config}  backend {os.environ.get('KERAS_BACKEND', 'torch')}"
          f"  {os.cpu_count()} CPUs visible")
    for step, s in seconds.items():
        print(f"  {step:<12}{s:8.1f} s")
    print(f"  {'label':<18}{'test AUC':>9}{'positives':>10}")
    for name in ("any", *SUBTYPES):
        auc = labels[name]["roc_auc"]
        print(f"  {name:<18}{'n/a' if auc is None else f'{auc:.4f}':>9}{labels[name]['support']:>10}")
    checks = [("AUC any", any_auc, ">=", GOALS["any"], any_auc is not None and any_auc >= GOALS["any"]),
              ("mean subtype AUC", mean_sub, ">=", GOALS["subtypes"], mean_sub >= GOALS["subtypes"]),
              ("train minutes", train_min, "<=", GOALS["train_minutes"], train_min <= GOALS["train_minutes"])]
    for name, value, op, goal, ok in checks:
        print(f"  {name:<18}{value:9.4f}  goal {op} {goal}  {'PASS' if ok else 'FAIL'}")
    return 0 if all(ok for *_, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
