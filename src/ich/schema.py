"""Types and ranges of every config key (pydantic v2); the defaults live in configs/base.yaml.

In: the merged config dict (base.yaml + experiment + --set). Out: the same dict, validated, with
ints given for float keys turned into floats (model_dump), or pydantic's ValidationError.

base.yaml is the one file of defaults (with a comment per key); the models here carry no
defaults, so every field is required and the two cannot drift apart silently: a test checks
that base.yaml validates unchanged and that both have exactly the same keys.

To add a key: one line in base.yaml (the default and a comment) and one line in the section's
class below (name: type and range). A new section: a class here and one field in `Config`.
Models are strict (no "3" for 3, no true for 1, no 2.5 for an int); an int is fine for a float.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# Reusable field types. `Real` keeps ints as ints (an int default stays an int in the dump).
PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
Real = int | float
Fraction = Annotated[Real, Field(ge=0, le=1)]          # probabilities and relative strengths
Probability = Fraction
Workers = Literal["auto"] | PositiveInt                # "auto" = every usable core
Switch = Literal["auto"] | bool                        # "auto" = on a GPU only
NonEmpty = Annotated[str, Field(min_length=1)]


def _window(pair: list) -> list:
    if pair[1] <= 0:
        raise ValueError("must be [center, width] in HU with width > 0")
    return pair


Window = Annotated[list[Real], Field(min_length=2, max_length=2), AfterValidator(_window)]
def _split_fraction(value: float) -> float:
    # Every split must hold images, or evaluation (test) and model selection (val) are impossible.
    if not 0 < value < 1:
        raise ValueError("every split fraction must lie strictly between 0 and 1: an empty "
                         "train, val or test split makes training or evaluation impossible")
    return value


SplitFraction = Annotated[Real, AfterValidator(_split_fraction)]


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise ValueError("must be odd: the convolution is centred on each slice")
    return value


class Section(BaseModel):
    """Common settings: unknown keys refused, strict types, no defaults (base.yaml has them)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Paths(Section):
    labels_csv: NonEmpty
    dicom_dir: NonEmpty
    work_dir: NonEmpty
    run_dir: NonEmpty


class Index(Section):
    workers: Workers
    pool: Literal["process", "thread"]
    chunk_size: PositiveInt


class Sample(Section):
    per_label: PositiveInt
    exclude_ids: list[str]
    unit: Literal["image", "series"]
    context: list[int]


class Copy(Section):
    mode: Literal["copy", "hardlink", "symlink"]
    workers: PositiveInt


class Preprocess(Section):
    workers: Workers
    image_size: PositiveInt
    windows: dict[str, Window]
    channels: Annotated[list[str], Field(min_length=3, max_length=3)]
    chunk_size: PositiveInt
    file_timeout_s: Annotated[Real, Field(gt=0)]
    max_file_mb: Annotated[Real, Field(gt=0)]
    retry_failed: bool

    @model_validator(mode="after")
    def _channels_are_windows(self):
        unknown = [name for name in self.channels if name not in self.windows]
        if unknown:
            raise ValueError(f"preprocess.channels: unknown window(s) {unknown}; "
                             f"defined windows: {sorted(self.windows)}")
        return self


class Compute(Section):
    scheduler: NonEmpty | None


class Input(Section):
    offsets: Annotated[list[int], Field(min_length=1)]
    slice_channels: NonEmpty


class Split(Section):
    fractions: Annotated[list[SplitFraction], Field(min_length=3, max_length=3)]

    @model_validator(mode="after")
    def _sum_to_one(self):
        if abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(f"split.fractions: {self.fractions} must be three numbers above 0 "
                             f"(train, val, test) summing to 1")
        return self


class Augment(Section):
    enabled: bool
    target_per_label: Count
    max_copies_per_image: Count
    workers: Workers
    hflip_p: Probability
    vflip_p: Probability
    rotate_limit: Annotated[Real, Field(ge=0, le=180)]  # degrees
    rotate_p: Probability
    brightness_limit: Fraction
    contrast_limit: Fraction
    brightness_contrast_p: Probability
    blur_p: Probability
    elastic_p: Probability
    elastic_alpha: Annotated[float, Field(ge=0)]
    elastic_sigma: Annotated[float, Field(gt=0)]


class OnlineAugment(Section):
    enabled: bool
    flip: Literal["horizontal", "vertical", "horizontal_and_vertical", "none"]
    rotation: Annotated[Real, Field(ge=0, le=0.5)]  # fraction of a full turn: 0.5 = 180 degrees
    brightness: Fraction
    contrast: Fraction
    zoom: Annotated[Real, Field(ge=0, lt=1)]
    translate: Fraction
    blur_p: Probability
    elastic_p: Probability
    elastic_scale: Fraction


class Data(Section):
    cache: Literal["packed", "png"]
    workers: Workers


class Model(Section):
    image_size: PositiveInt
    weights: str | None  # null | imagenet | a .weights.h5 file | a folder of them
    stage1_backbone: NonEmpty  # checked against the registry when the model is built (needs Keras)
    stage2_backbones: Annotated[list[NonEmpty], Field(min_length=1)]
    dropout: Annotated[Real, Field(ge=0, lt=1)]
    attention_heads: PositiveInt
    fusion_dim: PositiveInt
    stage2_from_stage1: bool


class Train(Section):
    backend: Literal["auto", "torch", "jax", "tensorflow"]
    mixed_precision: Switch
    jit_compile: Switch
    batch_size: PositiveInt
    stage2_batch_size: PositiveInt | None
    distribution: Literal["data_parallel"] | None
    stages: Annotated[list[NonEmpty], Field(min_length=1)]  # names checked by the train step
    frozen_epochs: Count
    finetune_epochs: Count
    stage2_finetune_epochs: Count | None
    frozen_lr: Annotated[float, Field(gt=0)]
    finetune_lr: Annotated[float, Field(gt=0)]
    steps_per_epoch: PositiveInt | None
    monitor: Literal["val_auc", "val_loss"]
    keep: Literal["best", "last"]
    lr_schedule: Literal["plateau", "cosine"]
    warmup_epochs: Annotated[Real, Field(ge=0)]
    early_stopping_patience: Count
    lr_patience: Count
    lr_factor: Annotated[float, Field(gt=0, lt=1)]  # Keras refuses a factor >= 1
    min_lr: Annotated[float, Field(ge=0)]
    class_weight: Literal["balanced", "none"]
    pos_weight: Literal["balanced", "none"]
    max_pos_weight: Annotated[float, Field(ge=1)]
    tensorboard: bool
    tensorboard_examples: Count


class Sequence(Section):
    width: PositiveInt
    kernel_size: Annotated[int, Field(ge=1), AfterValidator(_odd)]  # centred on each slice
    dilations: Annotated[list[PositiveInt], Field(min_length=1)]
    dropout: Annotated[Real, Field(ge=0, lt=1)]
    pooling: Literal["max", "attention"]
    epochs: PositiveInt
    lr: Annotated[float, Field(gt=0)]
    batch_size: PositiveInt


class Evaluate(Section):
    threshold_method: Literal["youden", "f1"]
    report_examples: Count
    bootstrap: Count
    calibration: Literal["none", "platt", "isotonic"]
    natural_prevalence: bool


class Explain(Section):
    feature_stride: Literal[4, 8, 16, 32]


class Predict(Section):
    batch_size: PositiveInt
    workers: Workers
    file_timeout_s: Annotated[Real, Field(gt=0)]
    max_file_mb: Annotated[Real, Field(gt=0)]
    retry_failed: bool
    keep_patient_id: bool


class Mlflow(Section):
    tracking_uri: NonEmpty
    experiment: NonEmpty


class Config(Section):
    """The whole config: one field per top-level key of base.yaml, in its order."""

    seed: Count
    paths: Paths
    index: Index
    sample: Sample
    copy_: Copy = Field(alias="copy")  # `copy` would shadow BaseModel.copy
    preprocess: Preprocess
    compute: Compute
    input: Input
    split: Split
    augment: Augment
    online_augment: OnlineAugment
    data: Data
    model: Model
    train: Train
    sequence: Sequence
    evaluate: Evaluate
    explain: Explain
    predict: Predict
    tracking: Literal["none", "mlflow"]
    mlflow: Mlflow

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True,
                              protected_namespaces=())
