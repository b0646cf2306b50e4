"""Step 6, train: every stage of the cascade in order, then the decision thresholds on val.

In: work_dir/splits.csv, png/, augmented.csv (read through ich.data.loading); config sections
input, model, train, online_augment, data, evaluate.threshold_method, seed, paths.
Out, in run_dir: one <stage>.keras per stage of train.stages (ich.training.trainer says what
else a stage writes), config.yaml (the resolved config of the run) and cascade.json: labels, the
input description, the stages (file, labels, the label each is conditional on, backbones),
per-label thresholds chosen on the validation split by evaluate.threshold_method, backend and
versions. `ich predict` and `ich evaluate` read cascade.json.

Each stage and the thresholds rerun exactly when the settings or inputs they depend on changed
(ich.stamps): a new split, new PNGs, other model or training settings, or a retrained stage
they start from. --force retrains every stage listed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np

from ich import backend, config
from ich.allocator import retain_freed_memory
from ich.constants import AUGMENTED_CSV, CASCADE_JSON, LABELS, SEQUENCE, SPLITS_CSV
from ich.data.inputs import InputSpec
from ich.data.loading import load_split
from ich.errors import StepError
from ich.evaluation.inference import load_cascade, refine_split
from ich.evaluation.metrics import choose_threshold
from ich.io import write_json
from ich.stamps import Stamp, reason, record, record_path
from ich.training import distribution
from ich.training.sequence import train_sequence
from ich.training.stages import (STAGES, Stage, get_stage, image_stage_names, stage_batch_size,
                                 stage_entry, stage_seed)
from ich.training.trainer import clear_stage, train_stage

log = logging.getLogger("ich")

RUN_CONFIG = "config.yaml"        # resolved config of the run, in run_dir


def stage_stamp(cfg: dict, stage: Stage) -> Stamp:
    """What `stage`'s model depends on: its settings, the split, the PNGs (through preprocess's
    record), the augmented copies, and the trained stages it starts from."""
    work, run_dir = Path(cfg["paths"]["work_dir"]), Path(cfg["paths"]["run_dir"])
    inputs = [work / SPLITS_CSV, record_path(work, "preprocess")]
    if cfg["augment"]["enabled"] and stage.kind != SEQUENCE:  # augmented copies have no series
        inputs += [work / AUGMENTED_CSV, record_path(work, "augment")]
    inputs += [run_dir / STAGES[name].file for name in stage.starts_from(cfg)]
    return Stamp(f"train.{stage.name}", run_dir, settings=stage.settings(cfg), inputs=inputs,
                 outputs=[run_dir / stage.file])


def run_stages(cfg: dict) -> list[str]:
    """The stages cascade.json lists: every image stage, then the sequence stage when
    train.stages names it (an old sequence model of a run that no longer lists it is ignored)."""
    return [*image_stage_names(), *(name for name in cfg["train"]["stages"]
                                    if name in STAGES and STAGES[name].kind == SEQUENCE)]


def thresholds_stamp(cfg: dict) -> Stamp:
    """The thresholds depend on the method, every stage's model and the validation split."""
    work, run_dir = Path(cfg["paths"]["work_dir"]), Path(cfg["paths"]["run_dir"])
    return Stamp("train.thresholds", run_dir,
                 settings={"threshold_method": cfg["evaluate"]["threshold_method"],
                           "stages": run_stages(cfg)},
                 inputs=[work / SPLITS_CSV, record_path(work, "preprocess"),
                         *(run_dir / STAGES[name].file for name in run_stages(cfg))],
                 outputs=[run_dir / CASCADE_JSON])


def stamps(cfg: dict) -> list[Stamp]:
    """One stamp per stage of train.stages, then the thresholds'."""
    return [stage_stamp(cfg, get_stage(name)) for name in cfg["train"]["stages"]] + [thresholds_stamp(cfg)]


def run(cfg: dict, force: bool = False) -> Path:
    """Train the stages of train.stages that are stale (all with force), choose the thresholds,
    and return the path of run_dir/cascade.json."""
    try:
        names = [get_stage(name).name for name in cfg["train"]["stages"]]
    except ValueError as err:
        raise StepError(f"train.stages: {err}") from err
    # Issue 11 hook: train.distribution. First, before anything touches a device: several hosts
    # join here (JAX); process k > 0 writes its own copy of the run under run_dir/process-k.
    plan = distribution.plan(cfg)
    if plan.process_id:
        cfg = {**cfg, "paths": {**cfg["paths"], "run_dir": str(plan.run_dir(cfg["paths"]["run_dir"]))}}
    run_dir = Path(cfg["paths"]["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = InputSpec.from_config(cfg)
    mixed = backend.resolve_mixed_precision(cfg["train"]["mixed_precision"])
    jit = backend.resolve_jit(cfg["train"]["jit_compile"])
    log.info("train: backend %s, mixed precision %s, jit_compile %s, input %d channels (offsets %s)",
             backend.current(), mixed, jit, spec.n_channels, list(spec.offsets))
    own = cfg["train"]["stage2_batch_size"]
    log.info("train: %s, global batch %d%s", plan.describe(), int(cfg["train"]["batch_size"]),
             f" (stage 2: {int(own)})" if own is not None else "")
    config.save(cfg, run_dir / RUN_CONFIG)
    retain_freed_memory()  # each step's activations reuse the last step's pages (ich.allocator)

    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        with plan.active():  # issue 11 hook: stages are built, compiled and fitted over the plan's devices
            for name in names:
                stage = STAGES[name]
                stamp = stage_stamp(cfg, stage)
                why = "forced" if force else reason(stamp)
                if why is None:
                    log.info("train: %s is up to date, skipped (use --force to retrain)", stage.name)
                    continue
                missing = [d for d in stage.starts_from(cfg) if not (run_dir / STAGES[d].file).is_file()]
                if missing:
                    hint = ("" if stage.kind == SEQUENCE else
                            " or set model.stage2_from_stage1 false")
                    raise StepError(f"{stage.name} starts from {missing}, which are not trained: add "
                                    f"them to train.stages{hint}")
                log.info("train: training %s (%s)", stage.name, why)
                if force or (run_dir / stage.file).exists():
                    clear_stage(run_dir, stage)  # a finished model of other settings: start over
                if stage.kind == SEQUENCE:
                    train_sequence(cfg, stage, run_dir, stamp, series_splits(cfg, spec))
                else:
                    train_stage(cfg, stage, spec, run_dir, stamp, stage_data(cfg, stage, spec, plan), jit)
                record(stamp)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    absent = [STAGES[name].file for name in run_stages(cfg) if not (run_dir / STAGES[name].file).is_file()]
    if absent:
        raise StepError(f"{run_dir}: {', '.join(absent)} missing, so no {CASCADE_JSON} was written; "
                        f"add the stage(s) to train.stages and run `ich train` again")
    cascade_path = run_dir / CASCADE_JSON
    thresholds = thresholds_stamp(cfg)
    why = "forced" if force else reason(thresholds)
    if why is not None:
        log.info("train: choosing thresholds on the validation split (%s)", why)
        write_thresholds(cfg, spec, mixed)
        record(thresholds)
    return cascade_path


def stage_data(cfg: dict, stage: Stage, spec: InputSpec, plan: distribution.Plan | None = None):
    """(train batches, val batches, training labels) of a stage: the rows it trains on
    (Stage.rows) of the train and val splits, against its labels; with a distribution `plan`,
    the batches are this process's even share of each global batch (ich.training.distribution)."""
    work = Path(cfg["paths"]["work_dir"])
    batch_size = stage_batch_size(cfg, stage)
    workers = config.resolve_workers(cfg["data"]["workers"])
    seed = stage_seed(cfg, stage)
    out = []
    for split in ("train", "val"):
        try:
            data = load_split(work, split, spec, cfg["data"]["cache"], workers,
                              include_augmented=cfg["augment"]["enabled"] and split == "train")
        except ValueError as err:
            raise StepError(str(err)) from err
        targets = data.table.iloc[data.targets]
        rows = data.targets[stage.rows(targets)]
        labels = data.table[list(stage.labels)].to_numpy()[rows]
        if len(rows) == 0 or (len(stage.labels) == 1 and len(np.unique(labels)) < 2):
            what = (f"images positive for {stage.given}" if stage.given
                    else f"images with both classes of {stage.labels[0]}")
            raise StepError(f"{stage.name}: the {split} split has no {what} ({len(targets)} images "
                            f"in all); sample more images or change split.fractions")
        batches = data.batches(stage.labels, batch_size, spec, shuffle=split == "train",
                               seed=seed, rows=rows)
        out.append(plan.feed(batches, train=split == "train") if plan else batches)  # issue 11 hook
        if split == "train":
            y_train = labels.astype(np.float32)
    return out[0], out[1], y_train


def series_splits(cfg: dict, spec: InputSpec) -> dict:
    """The train and val splits without augmented copies (they have no series): what the
    sequence stage trains and validates on."""
    work = Path(cfg["paths"]["work_dir"])
    workers = config.resolve_workers(cfg["data"]["workers"])
    try:
        return {split: load_split(work, split, spec, cfg["data"]["cache"], workers)
                for split in ("train", "val")}
    except ValueError as err:
        raise StepError(str(err)) from err


def cascade_description(cfg: dict, spec: InputSpec, mixed_precision: bool) -> dict:
    """The cascade.json content for the models trained with `cfg` (thresholds at 0.5)."""
    return {
        "labels": list(LABELS),
        "input": spec.to_json(),
        "stages": [stage_entry(cfg, STAGES[name]) for name in run_stages(cfg)],
        "thresholds": {label: 0.5 for label in LABELS},
        "threshold_method": None,
        "backend": backend.current(),
        "versions": backend.versions(),
        "mixed_precision": bool(mixed_precision),
    }


def write_thresholds(cfg: dict, spec: InputSpec, mixed_precision: bool) -> Path:
    """Write cascade.json, then choose each label's threshold on the validation split
    (evaluate.threshold_method) and write it again with them. They belong to the run:
    `ich predict` applies them and `ich evaluate` reports at them. They are chosen for the run's
    final per-slice output (the sequence stage's refined probabilities when the run has one;
    the image stages' own then get "cascade_thresholds")."""
    run_dir = Path(cfg["paths"]["run_dir"])
    meta = cascade_description(cfg, spec, mixed_precision)
    write_json(meta, run_dir / CASCADE_JSON)
    method = cfg["evaluate"]["threshold_method"]
    data = load_split(Path(cfg["paths"]["work_dir"]), "val", spec, cfg["data"]["cache"],
                      config.resolve_workers(cfg["data"]["workers"]))
    if len(data.targets):
        cascade = load_cascade(run_dir)
        levels = refine_split(cascade, data, int(cfg["predict"]["batch_size"]), "val")
        truth = data.table.iloc[data.targets][list(LABELS)].to_numpy()

        def chosen(probs):
            return {label: choose_threshold(truth[:, j], probs[:, j], method)
                    for j, label in enumerate(LABELS)}

        meta["thresholds"] = chosen(levels["refined"])
        if cascade.sequence_stage is not None:
            meta["cascade_thresholds"] = chosen(levels["cascade"])
    else:
        log.warning("train: the val split is empty; every threshold stays 0.5")
    meta["threshold_method"] = method
    return write_json(meta, run_dir / CASCADE_JSON)
