"""The learning rate of one training phase (train.lr_schedule).

  plateau  the phase's LR, constant until the monitored value stops improving, then cut by
           train.lr_factor (ReduceLROnPlateau in ich.training.callbacks): follows the
           validation split, so a small, noisy one cuts it on chance dips
  cosine   a linear warm-up over train.warmup_epochs from train.min_lr to the phase's LR, then a
           cosine decay to train.min_lr at the last step of the phase, per optimizer step
           (keras.optimizers.schedules.CosineDecay): independent of the validation split, the
           usual recipe for training from random init (timm's default)

A cosine LR is a function of the optimizer's step count alone, which BackupAndRestore saves
with the optimizer: a resumed phase continues the same curve.
"""

from __future__ import annotations

import keras

SCHEDULES = ("plateau", "cosine")


def learning_rate(train: dict, peak: float, epochs: int, steps_per_epoch: int):
    """The Adam learning rate of a phase of `epochs` epochs of `steps_per_epoch` steps that
    trains at `peak`: the float `peak` (plateau) or a CosineDecay schedule (cosine)."""
    schedule = train["lr_schedule"]
    if schedule == "plateau":
        return float(peak)
    if schedule != "cosine":
        raise ValueError(f"train.lr_schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
    total = max(int(epochs) * int(steps_per_epoch), 1)
    # Warm-up never takes the whole phase: at least one step of decay is left.
    warmup = min(int(round(float(train["warmup_epochs"]) * int(steps_per_epoch))), total - 1)
    floor = min(float(train["min_lr"]), float(peak))
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(float(peak), total, alpha=floor / peak)
    return keras.optimizers.schedules.CosineDecay(floor, total - warmup, alpha=floor / peak,
                                                  warmup_target=float(peak), warmup_steps=warmup)


def cuts_on_plateau(train: dict) -> bool:
    """Whether the phase's LR is cut by ReduceLROnPlateau (plateau) rather than scheduled."""
    return train["lr_schedule"] == "plateau"
