"""The two-stage cascade: stage 1 detects any hemorrhage, stage 2 names the subtypes.

In: backbone names, the input shape (S, S, C) from the input description (an int S means
(S, S, 3): one slice, three windows), weights, head sizes, an optional augmentation layer.
Out: functional keras.Models taking float32 (N, S, S, C) in [0, 1]:
  stage 1 -> (N, 1) float32 sigmoid p(any), output "any";
  stage 2 -> (N, 5) float32 sigmoid p(subtype | any) in SUBTYPES order, output "subtypes".
Heads are float32 even under a mixed_float16 policy, so probabilities and losses stay exact.

Stage 2 fusion and attention (why this design):
  Each backbone's last feature map is projected to `fusion_dim` channels by a 1x1 convolution
  and LayerNorm (the two families have different widths and scales; the norm keeps one from
  drowning the other), brought to a common grid (both families have stride 32, so this is a
  no-op unless S is not a multiple of 32), and flattened into tokens. The two token sets are
  concatenated (2*h*w tokens), given a learned per-token embedding (position and source), and
  passed through one transformer block: multi-head self-attention + residual + LayerNorm, then a
  2-layer MLP + residual + LayerNorm; mean pooling over tokens feeds the head. Self-attention
  lets every region of one backbone look at every region of the other, so the fusion is learnt
  rather than a fixed concatenation; with 2*8*8 = 128 tokens at 256 px it costs well under 1% of
  the backbones' FLOPs, so it stays cheap on CPU.

Freezing (`set_backbone_trainable`): see its docstring for the pretrained vs random-init rule.
"""

from __future__ import annotations

from typing import Sequence

import keras

from ich.constants import SUBTYPES
from ich.models.backbones import PREFIX, build_backbone, check_name
from ich.models.graph import with_fast_graph
from ich.models.layers import TokenEmbedding

STAGE2_FAMILIES = ("EfficientNetV2", "ConvNeXt")


def input_shape_of(shape: int | Sequence[int]) -> tuple[int, int, int]:
    """(S, S, C) from an (S, S, C) sequence, or (S, S, 3) from a side S."""
    if isinstance(shape, int):
        return (shape, shape, 3)
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3:
        raise ValueError(f"input shape must be (S, S, C), got {shape}")
    return shape


def build_stage1(backbone: str, image_size: int | Sequence[int], weights: str | None = None, dropout: float = 0.3,
                 augmentation: keras.layers.Layer | None = None) -> keras.Model:
    """Stage 1: [0,1] image -> optional augmentation -> backbone -> GAP -> Dropout -> p(any).

    Returns a model named "stage1" with one float32 output (N, 1) named "any".
    """
    shape = input_shape_of(image_size)
    inputs = keras.Input(shape=shape, dtype="float32", name="image")
    x = augmentation(inputs) if augmentation is not None else inputs
    x = build_backbone(backbone, shape, weights)(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="any")(x)
    return with_fast_graph(keras.Model(inputs, outputs, name="stage1"))


def build_stage2(backbones: Sequence[str], image_size: int | Sequence[int], weights: str | None = None,
                 dropout: float = 0.3, fusion_dim: int = 256, attention_heads: int = 4,
                 augmentation: keras.layers.Layer | None = None) -> keras.Model:
    """Stage 2: two backbones on the same image, token fusion + self-attention, p(subtype | any).

    `backbones` = [an EfficientNetV2 name, a ConvNeXt name]. Returns a model named "stage2" with
    one float32 output (N, 5) named "subtypes" in SUBTYPES order.
    """
    backbones = list(backbones)
    if len(backbones) != 2:
        raise ValueError(f"stage 2 takes exactly two backbones, got {backbones}")
    for name, family in zip(backbones, STAGE2_FAMILIES):
        if not check_name(name).startswith(family):
            raise ValueError(f"stage 2 backbones must be [EfficientNetV2*, ConvNeXt*], got {backbones}")
    if fusion_dim % attention_heads:
        raise ValueError(f"fusion_dim {fusion_dim} must be divisible by attention_heads {attention_heads}")

    shape = input_shape_of(image_size)
    inputs = keras.Input(shape=shape, dtype="float32", name="image")
    x = augmentation(inputs) if augmentation is not None else inputs
    maps = [build_backbone(name, shape, weights)(x) for name in backbones]
    grid = tuple(maps[0].shape[1:3])

    tokens = []
    for i, feature_map in enumerate(maps):
        if tuple(feature_map.shape[1:3]) != grid:
            feature_map = keras.layers.Resizing(*grid, interpolation="bilinear",
                                                name=f"fuse_resize_{i}")(feature_map)
        y = keras.layers.Conv2D(fusion_dim, 1, name=f"fuse_proj_{i}")(feature_map)
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"fuse_norm_{i}")(y)
        tokens.append(keras.layers.Reshape((grid[0] * grid[1], fusion_dim), name=f"fuse_tokens_{i}")(y))
    t = keras.layers.Concatenate(axis=1, name="fuse_concat")(tokens)
    t = TokenEmbedding(name="fuse_embedding")(t)

    attended = keras.layers.MultiHeadAttention(
        num_heads=attention_heads, key_dim=fusion_dim // attention_heads, name="attention")(t, t)
    t = keras.layers.LayerNormalization(epsilon=1e-6, name="attention_norm")(
        keras.layers.Add(name="attention_residual")([t, attended]))
    mlp = keras.layers.Dense(2 * fusion_dim, activation="gelu", name="mlp_expand")(t)
    mlp = keras.layers.Dense(fusion_dim, name="mlp_project")(mlp)
    t = keras.layers.LayerNormalization(epsilon=1e-6, name="mlp_norm")(
        keras.layers.Add(name="mlp_residual")([t, mlp]))

    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(t)
    pooled = keras.layers.Dropout(dropout, name="head_dropout")(pooled)
    outputs = keras.layers.Dense(len(SUBTYPES), activation="sigmoid", dtype="float32",
                                 name="subtypes")(pooled)
    return with_fast_graph(keras.Model(inputs, outputs, name="stage2"))


def backbone_layers(model: keras.Model) -> list[keras.Model]:
    """The backbone sub-models of a cascade model (layers named PREFIX + backbone name)."""
    return [layer for layer in model.layers if layer.name.startswith(PREFIX)]


def set_backbone_trainable(model: keras.Model, trainable: bool, pretrained: bool = True) -> None:
    """Freeze (trainable=False) or unfreeze the backbones of `model`; recompile afterwards.

    Pretrained weights: unfreezing keeps every BatchNormalization layer frozen, which in Keras 3
    also runs it in inference mode, so small fine-tuning batches cannot wreck the ImageNet
    statistics. Random init (pretrained=False): there are no statistics to protect and moving
    averages that never update would be those of the initialiser, so BatchNorm trains normally.
    The head (everything outside the backbones) always stays trainable.
    """
    for backbone in backbone_layers(model):
        backbone.trainable = trainable
        if trainable and pretrained:
            for layer in _walk(backbone):
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False


def _walk(layer):
    """`layer` and, recursively, every layer nested inside it."""
    yield layer
    for sub in getattr(layer, "layers", []):
        yield from _walk(sub)
