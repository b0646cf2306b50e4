"""The study-level sequence stage: per-slice features of a series in, refined probabilities out.

In: `features` (N_series, T, D) float, the cascade's per-slice feature vectors of each series
ordered by position along the slice normal and zero-padded to T slices; `mask` (N_series, T),
1 for real slices and 0 for padding; optionally `probabilities` (N_series, T, 6), the
cascade's per-slice probabilities in LABELS order. Out: a dict of two tensors, `slices`
(N_series, T, 6) refined per-slice probabilities and `study` (N_series, 6), one set per series.

Why a 1D convolution and not a bidirectional GRU: a stack of dilated, residual 1D
convolutions sees +-(receptive field) slices, which covers a head CT series (20-60 slices at
~5 mm) in four layers, runs as a handful of batched matrix products on every backend and
compiles under XLA; Keras 3 runs a GRU on torch and JAX as a loop over time steps (cuDNN only
on TensorFlow, only without a mask), and its masking rules differ between backends. Padding
is handled by multiplying by the mask after every convolution, so padded steps never leak
into real ones, and the outputs at padded steps are zero.

The study output is the maximum over the real slices of the refined probabilities
(`pooling="max"`: a study is positive when any slice is), or attention pooling
(`pooling="attention"`: a learned weight per slice, softmax over the real slices only).
"""

from __future__ import annotations

import keras

from ich.constants import LABELS

N_LABELS = len(LABELS)
POOLINGS = ("max", "attention")


@keras.saving.register_keras_serializable(package="ich")
class MaskedSequence(keras.layers.Layer):
    """Multiply a (N, T, C) sequence by its (N, T) 0/1 mask: padded steps become zero."""

    def call(self, values, mask_values):
        """Return values * mask, broadcast over channels."""
        return values * keras.ops.cast(mask_values, values.dtype)[:, :, None]

    def compute_output_shape(self, values_shape, mask_values_shape=None):
        """Same shape as the sequence."""
        return values_shape

    def get_config(self):
        """No arguments beyond the base layer's."""
        return super().get_config()


@keras.saving.register_keras_serializable(package="ich")
class MaskedMaxPool(keras.layers.Layer):
    """Maximum over the real steps of a (N, T, C) sequence -> (N, C); padded steps never win."""

    def call(self, values, mask_values):
        """Max over time with padded steps pushed below any probability."""
        mask = keras.ops.cast(mask_values, values.dtype)[:, :, None]
        low = keras.ops.cast(-1e4, values.dtype)  # below any probability, safe in float16
        return keras.ops.max(keras.ops.where(mask > 0, values, low), axis=1)

    def compute_output_shape(self, values_shape, mask_values_shape=None):
        """(N, C)."""
        return (values_shape[0], values_shape[2])

    def get_config(self):
        """No arguments beyond the base layer's."""
        return super().get_config()


@keras.saving.register_keras_serializable(package="ich")
class MaskedAttentionPool(keras.layers.Layer):
    """Softmax-weighted mean of `values` (N, T, C) with weights from `scores` (N, T, 1),
    over the real steps only."""

    def call(self, values, scores, mask_values):
        """Softmax of the scores over unmasked steps, then the weighted sum of the values."""
        mask = keras.ops.cast(mask_values, scores.dtype)[:, :, None]
        scores = keras.ops.where(mask > 0, scores, keras.ops.cast(-1e4, scores.dtype))
        weights = keras.ops.softmax(scores, axis=1) * mask
        weights = weights / keras.ops.maximum(keras.ops.sum(weights, axis=1, keepdims=True), 1e-6)
        return keras.ops.sum(weights * values, axis=1)

    def compute_output_shape(self, values_shape, scores_shape=None, mask_values_shape=None):
        """(N, C)."""
        return (values_shape[0], values_shape[2])

    def get_config(self):
        """No arguments beyond the base layer's."""
        return super().get_config()


@keras.saving.register_keras_serializable(package="ich")
class ProbabilityLogits(keras.layers.Layer):
    """Probabilities -> logits, clipped to [1e-4, 1 - 1e-4] first so 0 and 1 stay finite."""

    def call(self, inputs):
        """log(p) - log(1 - p) of the clipped probabilities."""
        p = keras.ops.clip(inputs, 1e-4, 1 - 1e-4)
        return keras.ops.log(p) - keras.ops.log(1 - p)

    def compute_output_shape(self, input_shape):
        """Same shape as the input."""
        return input_shape

    def get_config(self):
        """No arguments beyond the base layer's."""
        return super().get_config()


def receptive_field(kernel_size: int, dilations) -> int:
    """Slices each output sees on either side: sum over layers of (kernel - 1) / 2 x dilation."""
    return sum((kernel_size - 1) // 2 * d for d in dilations)


def build_sequence(feature_dim: int, with_probabilities: bool = True, width: int = 128,
                   kernel_size: int = 3, dilations=(1, 2, 4, 8), dropout: float = 0.2,
                   pooling: str = "max", max_slices: int | None = None,
                   name: str = "sequence") -> keras.Model:
    """The sequence stage: inputs `features` (N, T, feature_dim), `mask` (N, T) and, with
    `with_probabilities`, `probabilities` (N, T, 6); outputs {"slices": (N, T, 6), "study": (N, 6)}.

    T may be left open (None, the default) so one model takes series of any length. Each
    residual block: LayerNorm, dilated Conv1D (same padding), GELU, dropout, Conv1D 1x1, added
    back and re-masked. With probabilities, the per-slice logits start from the cascade's own
    (a residual on logit(p)), so an untrained stage reproduces the cascade.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r} is not one of {list(POOLINGS)}")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (centred on the slice), got {kernel_size}")
    features = keras.Input((max_slices, feature_dim), name="features")
    mask = keras.Input((max_slices,), name="mask")
    inputs = {"features": features, "mask": mask}
    x = features
    if with_probabilities:
        probabilities = keras.Input((max_slices, N_LABELS), name="probabilities")
        inputs["probabilities"] = probabilities
        prior = ProbabilityLogits(name="prior_logits")(probabilities)
        x = keras.layers.Concatenate(name="features_and_logits")([x, prior])
    x = keras.layers.Dense(width, name="project")(x)
    x = MaskedSequence(name="mask_project")(x, mask)
    for i, dilation in enumerate(dilations):
        h = keras.layers.LayerNormalization(name=f"block{i}_norm")(x)
        # Zero again after the norm (its bias would fill the padding): the convolution then
        # sees padding exactly like the zeros past the end of a series, so a series gives
        # the same outputs whatever it is padded to.
        h = MaskedSequence(name=f"block{i}_norm_mask")(h, mask)
        h = keras.layers.Conv1D(width, kernel_size, padding="same", dilation_rate=dilation,
                                name=f"block{i}_conv")(h)
        h = keras.layers.Activation("gelu", name=f"block{i}_gelu")(h)
        h = keras.layers.Dropout(dropout, name=f"block{i}_dropout")(h)
        h = keras.layers.Conv1D(width, 1, name=f"block{i}_mix")(h)
        x = keras.layers.Add(name=f"block{i}_add")([x, h])
        x = MaskedSequence(name=f"block{i}_mask")(x, mask)
    x = keras.layers.LayerNormalization(name="head_norm")(x)
    logits = keras.layers.Dense(N_LABELS, kernel_initializer="zeros", name="slice_logits")(x)
    if with_probabilities:
        logits = keras.layers.Add(name="refine_prior")([logits, prior])
    slices = keras.layers.Activation("sigmoid", name="slice_sigmoid")(logits)
    slices = MaskedSequence(name="slices")(slices, mask)
    if pooling == "max":
        study = MaskedMaxPool(name="study")(slices, mask)
    else:
        scores = keras.layers.Dense(1, name="attention_scores")(x)
        pooled = MaskedAttentionPool(name="attention_pool")(logits, scores, mask)
        study = keras.layers.Activation("sigmoid", name="study")(pooled)
    return keras.Model(inputs, {"slices": slices, "study": study}, name=name)


def training_model(model: keras.Model) -> keras.Model:
    """The sequence model with one output for fit: (N, T + 1, 6), the refined slices with the
    study row appended. One output keeps one loss and one monitored `val_auc`, so the stage
    trains with the same callbacks as the image stages; labels pad with PAD_LABEL (-1), which
    the loss and metric skip. It shares the model's layers: training it trains the model."""
    outputs = model(model.inputs if isinstance(model.inputs, dict) else
                    {t.name.split(":")[0]: t for t in model.inputs})
    study = keras.layers.Reshape((1, N_LABELS), name="study_row")(outputs["study"])
    joined = keras.layers.Concatenate(axis=1, name="slices_and_study")([outputs["slices"], study])
    return keras.Model(model.inputs, joined, name=f"{model.name}_training")


@keras.saving.register_keras_serializable(package="ich")
def masked_bce(y_true, y_pred):
    """Binary cross-entropy averaged over the entries whose label is not PAD_LABEL (< 0)."""
    y_true = keras.ops.cast(y_true, "float32")
    y_pred = keras.ops.clip(keras.ops.cast(y_pred, "float32"), 1e-7, 1 - 1e-7)
    real = keras.ops.cast(y_true >= 0, "float32")
    target = keras.ops.maximum(y_true, 0.0)
    loss = -(target * keras.ops.log(y_pred) + (1 - target) * keras.ops.log(1 - y_pred))
    return keras.ops.sum(loss * real) / keras.ops.maximum(keras.ops.sum(real), 1.0)


@keras.saving.register_keras_serializable(package="ich")
class MaskedAUC(keras.metrics.AUC):
    """ROC AUC over every (slice or study, label) entry whose label is not PAD_LABEL: one
    pooled AUC, steadier on a small validation split than a per-study AUC."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Flatten, weight padded entries 0, and clip their -1 labels to 0 (weight 0 anyway)."""
        y_true = keras.ops.reshape(keras.ops.cast(y_true, "float32"), (-1,))
        y_pred = keras.ops.reshape(keras.ops.cast(y_pred, "float32"), (-1,))
        weight = keras.ops.cast(y_true >= 0, "float32")
        return super().update_state(keras.ops.maximum(y_true, 0.0), y_pred, sample_weight=weight)
