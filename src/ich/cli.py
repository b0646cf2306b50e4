"""The one `ich` command: `ich <step> [--config C] [--set k=v ...] [--force]`, `ich run`,
`ich synth`, `ich predict`, `ich export`, `ich config show|init|schema`.

Each step lives in `ich.steps.<name>` and exposes `run(cfg, force=False) -> Path`. Steps are
imported lazily so that data steps start without importing Keras.

Exit codes (also in the README): 0 done; 1 an unexpected error (a bug: the traceback is
printed); 2 a usage, config or data error whose message names the fix; 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

from ich import __version__, backend
from ich import config as config_mod
from ich import provenance, tracking
from ich.constants import EXTERNAL_DATASETS, MODEL_SUFFIX, RESOLVED_CONFIG, STEPS
from ich.errors import StepError  # noqa: F401  (re-exported: steps raise ich.cli.StepError)
from ich.locks import LockError, hold
from ich.saved_models import reusing_loaded_models
from ich.stamps import step_reason

log = logging.getLogger("ich")

RUN_DIR_STEPS = ("train", "evaluate")   # steps that write into paths.run_dir


EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# Log files get timestamps and levels; the terminal gets the bare message.
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ich` console script; returns the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose, quiet=args.quiet, log_file=args.log_file)
    try:
        return args.func(args)
    except (config_mod.ConfigError, StepError, FileNotFoundError, LockError) as err:
        log.error("error: %s", err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.error("interrupted; finished work is kept, run the same command again to resume")
        return EXIT_INTERRUPTED


def setup_logging(verbose: bool = False, quiet: bool = False, log_file: str | None = None) -> None:
    """Messages of the `ich` logger to stderr and, with timestamps and levels, to `log_file`.

    The level is set on our logger, not the root: libraries keep their own (quieter) levels.
    -v shows debug messages, -q only warnings and errors (in the file too).
    """
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    for handler in [h for h in log.handlers if getattr(h, "_ich_log_file", False)]:
        log.removeHandler(handler)  # a second main() in one process must not log twice
        handler.close()
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        handler._ich_log_file = True
        log.addHandler(handler)


def choose_backend(cfg: dict) -> str:
    """Set the Keras backend from train.backend once, before any step imports Keras."""
    try:
        return backend.select_backend(cfg["train"]["backend"])
    except (RuntimeError, ImportError, ValueError) as err:
        raise StepError(f"train.backend: {err}") from err


def run_step(name: str, cfg: dict, force: bool = False) -> Path:
    """Run one pipeline step by name after saving the resolved config next to its outputs.

    Holds the work directory's lock (and the run directory's, for the steps that write there)
    for the step: a second `ich` on the same folder stops at once (LockError names the first).
    """
    work = Path(cfg["paths"]["work_dir"])
    run_dir = Path(cfg["paths"]["run_dir"])
    with ExitStack() as locks:
        locks.enter_context(reusing_loaded_models())
        locks.enter_context(hold(work, "work directory"))
        if name in RUN_DIR_STEPS:
            locks.enter_context(hold(run_dir, "run directory"))
        config_mod.save(cfg, work / RESOLVED_CONFIG)
        module = importlib.import_module(f"ich.steps.{name}")
        started, before = datetime.now(timezone.utc), _model_times(run_dir)
        result = module.run(cfg, force=force)
        # Provenance and tracking read what train/evaluate wrote; they run only after new work.
        if name == "train":
            if _model_times(run_dir) != before:  # trained now (a skipped train keeps its record)
                provenance.write(cfg, run_dir, started, datetime.now(timezone.utc))
            tracking.after_train(cfg, run_dir)
        elif name == "evaluate":
            tracking.after_evaluate(cfg, run_dir)
        return result


def _model_times(run_dir: Path) -> list[tuple[str, int]]:
    """Modification times of the stage models (None where absent): did this train write them?"""
    return [(p.name, p.stat().st_mtime_ns) for p in sorted(run_dir.glob(f"*{MODEL_SUFFIX}"))]


def _flag_overrides(args) -> list[str]:
    """--retry-failed / --keep-patient-id as the config keys they stand for."""
    extra = []
    if getattr(args, "retry_failed", False):
        extra += ["preprocess.retry_failed=true", "predict.retry_failed=true"]
    if getattr(args, "keep_patient_id", False):
        extra.append("predict.keep_patient_id=true")
    return extra


def _cmd_step(args) -> int:
    if getattr(args, "dataset", None):
        return _cmd_evaluate_external(args)
    cfg = config_mod.load(args.config, [*args.set, *_flag_overrides(args)])
    choose_backend(cfg)
    run_step(args.command, cfg, force=args.force)
    return 0


def _cmd_evaluate_external(args) -> int:
    missing = [f"--{k}" for k in ("model", "data", "out") if not getattr(args, k)]
    if missing:
        raise StepError(f"ich evaluate --dataset {args.dataset} needs {' '.join(missing)}")
    cfg = config_mod.load(args.config, list(args.set))
    choose_backend(cfg)
    from ich.steps.evaluate_external import run_external

    run_external(Path(args.model), args.dataset, Path(args.data), Path(args.out), cfg)
    return 0


def _cmd_run(args) -> int:
    cfg = config_mod.load(args.config, [*args.set, *_flag_overrides(args)])
    choose_backend(cfg)
    first = STEPS.index(args.from_step)
    last = STEPS.index(args.to_step)
    if first > last:
        raise StepError(f"--from {args.from_step} comes after --to {args.to_step}")
    if args.dry_run:
        print(dry_run(cfg, STEPS[first:last + 1], forced=args.from_step if args.force else None))
        return 0
    # One lock for the whole run, so no other ich slips in between two steps (run_step's is re-entrant).
    # A model one step loads is not read again by the next (ich.saved_models).
    with hold(Path(cfg["paths"]["work_dir"]), "work directory"), reusing_loaded_models():
        for name in STEPS[first:last + 1]:
            # --force applies to the first step only; later steps see its new outputs as stale.
            run_step(name, cfg, force=args.force and name == args.from_step)
    return 0


def dry_run(cfg: dict, steps, forced: str | None = None) -> str:
    """One line per step: whether it would run and why (ich.stamps), without running anything.

    A step is judged on the artifacts as they are now: once an earlier step would run, the
    steps after it would see new inputs, so they are reported as "after <step>" too.
    """
    lines, upstream = [], None
    for name in steps:
        why = "forced (--force)" if name == forced else step_reason(cfg, name)
        if why is None and upstream:
            why = f"after {upstream}, if its outputs change"
        if why is not None and upstream is None:
            upstream = name
        lines.append(f"{name:<11} {'up to date' if why is None else 'would run: ' + why}")
    return "\n".join(lines)


def _cmd_synth(args) -> int:
    from ich.synth import generate

    generate(Path(args.out_dir), patients=args.patients, slices=args.slices, seed=args.seed,
             workers=args.workers, size=args.size, difficulty=args.difficulty, masks=args.masks)
    return 0


def _cmd_predict(args) -> int:
    cfg = config_mod.load(args.config, [*args.set, *_flag_overrides(args)])
    from ich.evaluation.onnx_cascade import is_export

    if not is_export(args.model):  # an ONNX export runs in onnxruntime, with no Keras backend
        choose_backend(cfg)
    from ich.steps import predict  # after the backend is chosen: a Keras run imports Keras

    with hold(Path(args.out), "predict output folder"):
        predict.predict_paths([Path(p) for p in args.paths], Path(args.model), Path(args.out), cfg)
    return 0


def _cmd_explain(args) -> int:
    cfg = config_mod.load(args.config, list(args.set))
    choose_backend(cfg)
    from ich.steps import explain

    explain.explain_paths([Path(p) for p in args.paths], Path(args.model), Path(args.out), cfg,
                          every_label=args.every_label)
    return 0


def _cmd_export(args) -> int:
    from ich.steps.export import run_export

    run_export(Path(args.run_dir), Path(args.out), args.format)
    return 0


def _cmd_config_show(args) -> int:
    print(config_mod.dump(config_mod.load(args.config, args.set)), end="")
    return 0


def _cmd_config_init(args) -> int:
    path = config_mod.write_starter(Path(args.path), force=args.force)
    log.info("config: starter config written to %s; run `ich run --config %s`", path, path)
    return 0


def _cmd_config_schema(args) -> int:
    print(json.dumps(config_mod.json_schema(), indent=2))
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="C", help=(
        "experiment YAML overriding the defaults: a path, or a packaged config's name "
        f"({', '.join(config_mod.packaged_names())}); without it, the defaults (`ich config show`)"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, the value read as YAML (--set train.batch_size=16); repeatable")


def _add_retry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retry-failed", action="store_true",
                   help="try the files an earlier run listed in failures.csv again")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ich", description="Intracranial hemorrhage detection on head CT (RSNA 2019). "
        "Research use only, not for clinical diagnosis.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    parser.add_argument("--log-file", metavar="PATH",
                        help="also write every message, with timestamps, to PATH (appended)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "index": "read every DICOM header of paths.dicom_dir once -> work/index.parquet",
        "sample": "RSNA long CSV -> labels.csv (wide) and sampled.csv (balanced sample)",
        "copy": "copy the sampled DICOMs into work/dicom/ (threads)",
        "preprocess": "DICOM -> HU -> 3 windows -> RGB PNG in work/png/, images.csv, failures.csv",
        "split": "patient-grouped, label-stratified train/val/test -> splits.csv",
        "augment": "offline augmentation of the training split -> work/augmented/",
        "train": "train the two-stage cascade -> run_dir/stage1.keras, stage2.keras, cascade.json",
        "evaluate": "test-split metrics, plots, report.md and report.html -> run_dir/eval/; or, with "
                    "--dataset, a run on external data -> --out",
    }
    for name in STEPS:
        p = sub.add_parser(name, help=helps[name])
        _add_config_args(p)
        p.add_argument("--force", action="store_true", help="redo the step even if its outputs are complete")
        if name == "preprocess":
            _add_retry_arg(p)
        p.set_defaults(func=_cmd_step)
        if name == "evaluate":
            p.add_argument("--dataset", choices=EXTERNAL_DATASETS,
                           help="external data never used in training: cq500 | rsna | table (needs --model, --data, --out)")
            p.add_argument("--model", help="with --dataset: the run directory to evaluate (never written to)")
            p.add_argument("--data", help="with --dataset: the CQ500 folder, the RSNA-format folder, or the table CSV")
            p.add_argument("--out", help="with --dataset: output folder for metrics.json, studies.csv, report.html")

    p = sub.add_parser("run", help="run several steps in order, skipping finished ones")
    _add_config_args(p)
    p.add_argument("--from", dest="from_step", choices=STEPS, default=STEPS[0], metavar="STEP",
                   help=f"first step ({', '.join(STEPS)}; default {STEPS[0]})")
    p.add_argument("--to", dest="to_step", choices=STEPS, default=STEPS[-1], metavar="STEP",
                   help=f"last step (default {STEPS[-1]})")
    p.add_argument("--force", action="store_true", help="redo the --from step even if complete")
    p.add_argument("--dry-run", action="store_true",
                   help="print which steps would run and why (stale, missing, forced), run nothing")
    _add_retry_arg(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("synth", help="write phantom head CTs in the exact RSNA file format")
    p.add_argument("out_dir", help="writes OUT_DIR/stage_2_train/ID_<hex>.dcm and OUT_DIR/stage_2_train.csv")
    p.add_argument("--patients", type=int, default=20, help="number of patients (one study each, some two)")
    p.add_argument("--slices", type=int, default=24, help="axial slices per study")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same files")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (RSNA: 512)")
    p.add_argument("--workers", default="auto", help="processes; auto = all cores")
    p.add_argument("--difficulty", default="easy",
                   help="easy (0, the original phantoms), medium (0.5), hard (1) or a number in [0, 1]: "
                   "smaller and fainter bleeds, hard negatives, head holder, streaks, more noise")
    p.add_argument("--masks", action="store_true",
                   help="also write OUT_DIR/masks/<image_id>.png: each slice's blood mask (bit i = SUBTYPES[i])")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("predict", help="predict DICOM files, folders of them, or PNGs")
    p.add_argument("paths", nargs="+", help="DICOM or PNG files, or folders of them")
    p.add_argument("--model", required=True, help="run directory holding stage1.keras, stage2.keras, cascade.json, "
                   "or an `ich export --format onnx` folder (then run by onnxruntime, without Keras)")
    p.add_argument("--out", required=True, help="output folder for predictions.csv, submission.csv, studies.csv")
    _add_config_args(p)
    _add_retry_arg(p)
    p.add_argument("--keep-patient-id", action="store_true",
                   help="write PatientID into studies.csv (off: outputs carry no patient identifiers)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="write a trained cascade as one ONNX graph (or SavedModel) for deployment")
    p.add_argument("run_dir", help="run directory holding stage1.keras, stage2.keras, cascade.json")
    p.add_argument("--format", choices=["onnx", "saved_model"], default="onnx",
                   help="onnx: DIR/cascade.onnx, run by `ich predict --model DIR` without Keras; "
                   "saved_model: DIR/saved_model/ (needs TensorFlow)")
    p.add_argument("--out", required=True, help="output folder for the model file and cascade.json")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("config", help="print the resolved config, write a starter config, or the JSON Schema")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    q = config_sub.add_parser("show", help="print the resolved config (defaults + --config + --set) as YAML")
    _add_config_args(q)
    q.set_defaults(func=_cmd_config_show)
    q = config_sub.add_parser("init", help="write a starter config: every key, its default and what it does")
    q.add_argument("path", help="YAML file to write, e.g. my_experiment.yaml")
    q.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    q.set_defaults(func=_cmd_config_init)
    q = config_sub.add_parser("schema", help="print the config's JSON Schema (for editors' completion and checks)")
    q.set_defaults(func=_cmd_config_schema)

    p = sub.add_parser("explain", help="Grad-CAM overlays for DICOM files, folders or PNGs")
    p.add_argument("paths", nargs="+", help="DICOM or PNG files, or folders of them")
    p.add_argument("--model", required=True, help="run directory holding the stages and cascade.json")
    p.add_argument("--out", required=True, help="output folder for <image_id>_<label>.png and explanations.csv")
    p.add_argument("--every-label", action="store_true",
                   help="an overlay for all six labels, not only those at or above their threshold")
    _add_config_args(p)
    p.set_defaults(func=_cmd_explain)
    return parser


if __name__ == "__main__":
    sys.exit(main())
