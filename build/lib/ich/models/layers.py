"""Custom Keras layers of the cascade, registered so `keras.saving.load_model` finds them.

In/out: tensors. `TokenEmbedding` adds one learned vector per token to a (N, T, D) sequence.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="ich")
class TokenEmbedding(keras.layers.Layer):
    """Add a learned embedding per token position to a (N, T, D) token sequence.

    Stage 2 concatenates the grid cells of two backbones into one sequence. Attention by itself
    is blind to order, so this tells it which cell of which backbone each token came from.
    Initialised small so that at first the features pass through almost unchanged.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    def build(self, input_shape):
        """Create the (T, D) table from the static token count and width of the input."""
        _, tokens, dim = input_shape
        if tokens is None or dim is None:
            raise ValueError(f"TokenEmbedding needs a static (T, D), got input shape {input_shape}")
        self.embedding = self.add_weight(
            name="embedding", shape=(tokens, dim),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02), trainable=True)

    def call(self, inputs):
        """Return inputs + embedding, broadcast over the batch."""
        return inputs + keras.ops.cast(self.embedding, inputs.dtype)[None, :, :]

    def compute_output_shape(self, input_shape):
        """Same shape as the input."""
        return input_shape

    def get_config(self):
        """No arguments beyond the base layer's: the table size comes from the input shape."""
        return super().get_config()
