"""Step train resumes after SIGKILL: the finished phase is skipped, the killed one continues at
the epoch after its last backup, and the history holds each epoch once (torch backend)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from pathlib import Path

from ich import config
from ich.constants import STAGE1_MODEL

from test_train import history, make_work, tiny_cfg

SIZE = 32


def random_backbone_weights(folder: Path) -> Path:
    """Save random-init backbone weights as a model.weights folder (stands in for pretrained)."""
    from ich.models.backbones import BACKBONES

    folder.mkdir()
    for name in ("EfficientNetV2B0", "ConvNeXtTiny"):
        BACKBONES[name](include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)).save_weights(
            folder / f"{name}.weights.h5")
    return folder


def wait_for(predicate, proc, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def epochs_backed_up(run_dir: Path, phase: str) -> int:
    meta = run_dir / "backup" / f"stage1_{phase}" / "training_metadata.json"
    try:
        return json.loads(meta.read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def run_until_killed(cmd, env, done_when, what):
    """Start `cmd`, SIGKILL it as soon as done_when() holds; fail if it ends before that."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        reached = wait_for(done_when, proc, timeout=300)
        assert reached, f"{what} never happened: {proc.stderr.read() if proc.poll() is not None else ''}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow  # three `ich train` processes: ~55 s on a 2-core Zen 1; test_train checks the resume rule in-process
def test_sigkill_in_each_phase_resumes_at_the_last_finished_epoch(tmp_path):
    """Pretrained path (weights folder), frozen 2 epochs then fine-tune 3: killed with SIGKILL
    after frozen epoch 1, rerun, killed again after fine-tune epoch 1, rerun to the end. Each
    rerun continues where the last backup left off, the finished phase is skipped, and the
    history holds every epoch exactly once."""
    make_work(tmp_path / "work")
    weights = random_backbone_weights(tmp_path / "weights")
    cfg = tiny_cfg(tmp_path, **{"model.weights": str(weights), "train.frozen_epochs": 2,
                                "train.finetune_epochs": 3, "train.stages": ["stage1"]})
    cfg_path = config.save(cfg, tmp_path / "cfg.yaml")
    run_dir = Path(cfg["paths"]["run_dir"])
    # The installed console script (python -m ich.cli would load a second copy of StepError).
    cmd = [str(Path(sys.executable).with_name("ich")), "train", "--config", str(cfg_path)]
    env = dict(os.environ, KERAS_BACKEND="torch")

    run_until_killed(cmd, env, lambda: epochs_backed_up(run_dir, "frozen") >= 1, "frozen epoch 1")
    assert not (run_dir / "backup" / "stage1_frozen.done.json").exists()
    assert (run_dir / "checkpoints" / "stage1_best.weights.h5").is_file()

    # The rerun resumes the frozen phase, then starts fine-tuning at epoch 1 (not at the frozen
    # phase's resume epoch, which Keras would otherwise carry over).
    run_until_killed(cmd, env, lambda: epochs_backed_up(run_dir, "finetune") >= 1, "fine-tune epoch 1")
    assert (run_dir / "backup" / "stage1_frozen.done.json").is_file()
    assert [int(r["epoch"]) for r in history(run_dir, "stage1_frozen")] == [0, 1]
    assert not (run_dir / STAGE1_MODEL).exists()

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # train.stages lacks stage2, so the step ends with "stage2.keras missing" after stage 1.
    assert done.returncode == 2 and "stage2.keras missing" in done.stderr, done.stderr[-3000:]
    assert "stage1 phase frozen already finished" in done.stderr
    epoch = int(done.stderr.split("stage1 phase finetune resumes at epoch ")[1].split()[0])
    assert epoch >= 2
    assert [int(r["epoch"]) for r in history(run_dir, "stage1_finetune")] == [0, 1, 2]
    assert (run_dir / STAGE1_MODEL).is_file()
    assert (run_dir / "backup" / "stage1_finetune.done.json").is_file()
    assert not (run_dir / "backup" / "stage1_finetune").exists()  # backup removed when done


@pytest.mark.slow  # two `ich train` processes (~35 s quiet); the resume rule's own test is fast
def test_killed_run_resplit_starts_the_stage_fresh(tmp_path):
    """Killed mid-phase, then the split changes (another seed): resuming would keep a "best"
    model chosen on patients that may now be test patients, so the stage starts over and the
    log says why."""
    import csv

    work = make_work(tmp_path / "work")
    cfg = tiny_cfg(tmp_path, **{"train.finetune_epochs": 4, "train.stages": ["stage1"]})
    cfg_path = config.save(cfg, tmp_path / "cfg.yaml")
    run_dir = Path(cfg["paths"]["run_dir"])
    cmd = [str(Path(sys.executable).with_name("ich")), "train", "--config", str(cfg_path)]
    env = dict(os.environ, KERAS_BACKEND="torch")
    run_until_killed(cmd, env, lambda: epochs_backed_up(run_dir, "finetune") >= 1, "fine-tune epoch 1")
    assert (run_dir / "checkpoints" / "stage1_best.weights.h5").is_file()

    # Re-split: swap one train and one val patient.
    splits = work / "splits.csv"
    with splits.open() as f:
        rows = list(csv.DictReader(f))
    first_val = next(r for r in rows if r["split"] == "val")
    rows[0]["split"], first_val["split"] = "val", "train"
    with splits.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "the interrupted run was made with other settings or data" in done.stderr, done.stderr[-3000:]
    assert re.search(r"input changed: \S*work/splits\.csv", done.stderr), done.stderr[-3000:]
    assert "starting the stage fresh" in done.stderr
    assert "resumes at epoch" not in done.stderr
    assert [int(r["epoch"]) for r in history(run_dir, "stage1_finetune")] == [0, 1, 2, 3]
    assert (run_dir / STAGE1_MODEL).is_file()
