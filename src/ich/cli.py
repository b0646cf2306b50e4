"""The one `ich` command: `ich <step> --config FILE [--set k=v ...] [--force]`, `ich run`,
`ich synth`, `ich predict`.

Each step lives in `ich.steps.<name>` and exposes `run(cfg, force=False) -> Path`. Steps are
imported lazily so that data steps start without importing Keras.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from ich import config as config_mod
from ich.constants import RESOLVED_CONFIG, STEPS
from ich.errors import StepError  # noqa: F401  (re-exported: steps raise ich.cli.StepError)

log = logging.getLogger("ich")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ich` console script; returns the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    # Set on our logger, not the root: libraries keep their own (quieter) levels.
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return args.func(args)
    except (config_mod.ConfigError, StepError, FileNotFoundError) as err:
        log.error("error: %s", err)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; finished work is kept, run the same command again to resume")
        return 130


def run_step(name: str, cfg: dict, force: bool = False) -> Path:
    """Run one pipeline step by name after saving the resolved config next to its outputs."""
    work = Path(cfg["paths"]["work_dir"])
    config_mod.save(cfg, work / RESOLVED_CONFIG)
    module = importlib.import_module(f"ich.steps.{name}")
    return module.run(cfg, force=force)


def _cmd_step(args) -> int:
    cfg = config_mod.load(args.config, args.set)
    run_step(args.command, cfg, force=args.force)
    return 0


def _cmd_run(args) -> int:
    cfg = config_mod.load(args.config, args.set)
    first = STEPS.index(args.from_step)
    last = STEPS.index(args.to_step)
    if first > last:
        raise StepError(f"--from {args.from_step} comes after --to {args.to_step}")
    for name in STEPS[first:last + 1]:
        # --force applies to the first step only; later steps see its new outputs as stale.
        run_step(name, cfg, force=args.force and name == args.from_step)
    return 0


def _cmd_synth(args) -> int:
    from ich.synth import generate

    generate(Path(args.out_dir), patients=args.patients, slices=args.slices, seed=args.seed,
             workers=args.workers, size=args.size, difficulty=args.difficulty, masks=args.masks)
    return 0


def _cmd_predict(args) -> int:
    from ich.steps import predict

    overrides = list(args.set)
    cfg = config_mod.load(args.config, overrides) if args.config else config_mod.load(None, overrides)
    predict.predict_paths([Path(p) for p in args.paths], Path(args.model), Path(args.out), cfg)
    return 0


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="experiment YAML (overrides configs/base.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key; repeatable")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ich", description="Intracranial hemorrhage detection on head CT (RSNA 2019). "
        "Research use only, not for clinical diagnosis.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "index": "read every DICOM header of paths.dicom_dir once -> work/index.parquet",
        "sample": "RSNA long CSV -> labels.csv (wide) and sampled.csv (balanced sample)",
        "copy": "copy the sampled DICOMs into work/dicom/ (threads)",
        "preprocess": "DICOM -> HU -> 3 windows -> RGB PNG in work/png/, images.csv, failures.csv",
        "split": "patient-grouped, label-stratified train/val/test -> splits.csv",
        "augment": "offline augmentation of the training split -> work/augmented/",
        "train": "train the two-stage cascade -> run_dir/stage1.keras, stage2.keras, cascade.json",
        "evaluate": "test-split metrics, plots and report.md -> run_dir/eval/",
    }
    for name in STEPS:
        p = sub.add_parser(name, help=helps[name])
        _add_config_args(p)
        p.add_argument("--force", action="store_true", help="redo the step even if its outputs are complete")
        p.set_defaults(func=_cmd_step)

    p = sub.add_parser("run", help="run several steps in order, skipping finished ones")
    _add_config_args(p)
    p.add_argument("--from", dest="from_step", choices=STEPS, default=STEPS[0])
    p.add_argument("--to", dest="to_step", choices=STEPS, default=STEPS[-1])
    p.add_argument("--force", action="store_true", help="redo the --from step even if complete")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("synth", help="write phantom head CTs in the exact RSNA file format")
    p.add_argument("out_dir", help="writes OUT_DIR/stage_2_train/ID_<hex>.dcm and OUT_DIR/stage_2_train.csv")
    p.add_argument("--patients", type=int, default=20, help="number of patients (one study each, some two)")
    p.add_argument("--slices", type=int, default=24, help="axial slices per study")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512, help="image side in pixels (RSNA: 512)")
    p.add_argument("--workers", default="auto", help="processes; auto = all cores")
    p.add_argument("--difficulty", default="easy",
                   help="easy (0, the original phantoms), medium (0.5), hard (1) or a number in [0, 1]: "
                   "smaller and fainter bleeds, hard negatives, head holder, streaks, more noise")
    p.add_argument("--masks", action="store_true",
                   help="also write OUT_DIR/masks/<image_id>_mask.png (uint8, 1 inside any bleed)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("predict", help="predict DICOM files, folders of them, or PNGs")
    p.add_argument("paths", nargs="+", help="DICOM or PNG files, or folders of them")
    p.add_argument("--model", required=True, help="run directory holding stage1.keras, stage2.keras, cascade.json")
    p.add_argument("--out", required=True, help="output folder for predictions.csv, submission.csv, studies.csv")
    _add_config_args(p, required=False)
    p.set_defaults(func=_cmd_predict)
    return parser


if __name__ == "__main__":
    sys.exit(main())
