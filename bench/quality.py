"""Benchmark: what the recipe learns on hard phantom head CTs, single slice against context.

Generates `ich synth --difficulty hard` data (60 patients x 24 slices, seed 0) unless present,
runs the data steps once with the packaged `quality` config (src/ich/configs/quality.yaml), then
trains and evaluates each variant from scratch on the same split:
  single slice       input.offsets [0], stages 1 and 2
  context + sequence input.offsets [-1, 0, 1] and the sequence stage; its evaluation reports the
                     image stages alone (the "neighbouring slices" row) and after the sequence
                     stage (the "sequence stage" row)
and prints slice-level test AUC per label, mean subtype AUC, study-level AUC any, and training
minutes per variant, against the goals of issue 7 (slice AUC any >= 0.98, mean subtype >= 0.95,
study AUC any >= 0.99, <= 20 training minutes per variant, on 2 CPU cores). Exit status 0 when
the best variant meets every goal.

    .venv/bin/python bench/quality.py [--variants single,context] [--keep] [--set KEY=VALUE ...]

`--set` overrides the recipe for training and evaluation of every variant (one experiment, e.g.
`--set train.stage2_finetune_epochs=8`) without editing quality.yaml; the data steps keep it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOALS = {"any": 0.98, "subtypes": 0.95, "study_any": 0.99, "train_minutes": 20.0}
SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
LABELS = ("any", *SUBTYPES)
VARIANTS = {
    "single": ["--set", "input.offsets=[0]", "--set", "train.stages=[stage1,stage2]"],
    "context": [],  # quality.yaml as it is
}


def machine() -> str:
    """CPU model and core count, so figures from different machines can be told apart."""
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores visible"


def ich(*args: str) -> float:
    """Run one `ich` command from the repo root (output shown live); return its seconds."""
    exe = Path(sys.executable).with_name("ich")
    start = time.perf_counter()
    subprocess.run([str(exe), *args], cwd=REPO, check=True,
                   env=dict(os.environ, KERAS_BACKEND=os.environ.get("KERAS_BACKEND", "torch")))
    return time.perf_counter() - start


def row(name: str, metrics: dict, studies: dict | None, minutes: float | None) -> dict:
    """One printed row: slice AUC per label, their subtype mean, study AUC any, minutes."""
    aucs = {label: metrics["labels"][label]["roc_auc"] for label in LABELS}
    subs = [aucs[s] for s in SUBTYPES if aucs[s] is not None]
    study = (studies or {}).get("labels", {}).get("any", {}).get("roc_auc")
    return {"name": name, **aucs, "subtypes": sum(subs) / len(subs) if subs else None,
            "study_any": study, "minutes": minutes}


def nan_if_none(value: float | None) -> float:
    """The value, or NaN where there is none (a label without both classes)."""
    return float("nan") if value is None else value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="single,context")
    parser.add_argument("--keep", action="store_true", help="reuse finished runs (default: train afresh)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for training and evaluation (repeatable)")
    args = parser.parse_args(argv)

    from ich import config as config_mod

    cfg = config_mod.load("quality")
    labels_csv = REPO / cfg["paths"]["labels_csv"]
    seconds = {}
    if not labels_csv.is_file():
        seconds["synth"] = ich("synth", str(labels_csv.parent), "--patients", "60", "--slices", "24",
                               "--seed", "0", "--difficulty", "hard")
    seconds["data steps"] = ich("run", "--config", "quality", "--to", "augment")
    rows = []
    for variant in args.variants.split(","):
        run_dir = f"{cfg['paths']['run_dir']}_{variant}"
        sets = [*VARIANTS[variant], *(a for kv in args.sets for a in ("--set", kv)),
                "--set", f"paths.run_dir={run_dir}"]
        if (REPO / run_dir).exists() and not args.keep:
            shutil.rmtree(REPO / run_dir)
        reused = (REPO / run_dir / "cascade.json").is_file()   # --keep: `ich train` may skip
        minutes = ich("train", "--config", "quality", *sets) / 60
        minutes = None if reused else minutes   # a skipped training's seconds are no training time
        seconds[f"evaluate {variant}"] = ich("evaluate", "--config", "quality", *sets)
        metrics = json.loads((REPO / run_dir / "eval" / "metrics.json").read_text())
        if "image_stages" in metrics:   # context run: the image stages alone, then the sequence stage
            image = metrics["image_stages"]
            rows.append(row("neighbouring slices", image, image.get("studies"), minutes))
            rows.append(row("+ sequence stage", metrics, metrics.get("studies"), minutes))
        else:
            rows.append(row("single slice", metrics, metrics.get("studies"), minutes))

    print(f"\nbench/quality.py  {machine()}  backend {os.environ.get('KERAS_BACKEND', 'torch')}")
    if args.sets:
        print(f"  overrides: {' '.join(args.sets)}")
    for step, s in seconds.items():
        print(f"  {step:<22}{s:8.1f} s")
    head = "".join(f"{label[:8]:>9}" for label in LABELS)
    print(f"  {'variant':<22}{head}{'mean sub':>9}{'study any':>10}{'train min':>10}")
    for r in rows:
        cells = "".join(f"{'n/a' if r[label] is None else format(r[label], '.4f'):>9}" for label in LABELS)
        minutes = "reused" if r["minutes"] is None else f"{r['minutes']:.1f}"
        # `is None`, not `or`: an AUC of 0.0 (every study ranked backwards) is a result, not n/a.
        print(f"  {r['name']:<22}{cells}{nan_if_none(r['subtypes']):9.4f}"
              f"{nan_if_none(r['study_any']):10.4f}{minutes:>10}")
    best = max(rows, key=lambda r: r["any"] or 0)
    checks = [("slice AUC any", best["any"], GOALS["any"], ">="),
              ("mean subtype AUC", best["subtypes"], GOALS["subtypes"], ">="),
              ("study AUC any", max((r["study_any"] or 0) for r in rows), GOALS["study_any"], ">="),
              ("train minutes (max)", max((r["minutes"] for r in rows if r["minutes"] is not None),
                                          default=None), GOALS["train_minutes"], "<=")]
    ok_all = True
    for name, value, goal, op in checks:
        ok = value is not None and (value >= goal if op == ">=" else value <= goal)
        ok_all &= ok
        print(f"  {name:<22}{value if value is not None else float('nan'):9.4f}  goal {op} {goal}  "
              f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
