"""Custom Keras layers of the cascade, registered so `keras.saving.load_model` finds them.

In/out: tensors. `TokenEmbedding` adds one learned vector per token to a (N, T, D) sequence.
`FastConv2D`, `FastDepthwiseConv2D`, `FastBatchNormalization`, `FastDense` and `FastDropout` are the Keras
layers with a faster call on the torch backend (same weights and results within float tolerance);
`with_fast_layers` swaps them into a built backbone.
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


# ------------------------------------------------------------------------------------------
# Torch fast paths of the backbones' convolution and batch-normalisation layers.
#
# Why (bench/profile_train.py, stage 1 at 64-128 px on CPU): Keras 3.15's torch backend turns
# every channels-last convolution into permute + .contiguous() (a copy to NCHW) + a copy back
# to torch's channels_last memory format, and computes BatchNormalization in training from
# about a dozen elementwise and reduction operators (E[x^2] - E[x]^2, then subtract, multiply,
# add) instead of torch's one fused kernel and its fused backward. Together those made ich's
# EfficientNetV2B0 step issue over twice as many operators as timm's and spend most of its time
# outside the convolutions. The layers below are the Keras layers with the same weights,
# arguments and saved config; on the torch backend (channels-last, float32, no mask, no
# renorm) their call is a permuted *view* into torch.nn.functional.conv2d (which reads and
# writes channels_last memory natively: no copy) and torch.native_batch_norm; on every other
# backend, and in every other case, they run the Keras layer's own code unchanged.
# ------------------------------------------------------------------------------------------

# Resolved once: the backend is fixed for the process before Keras is imported.
_ON_TORCH = keras.backend.backend() == "torch"


def _torch_fast(inputs, data_format: str = "channels_last") -> bool:
    """True when the torch fast path applies: torch backend, channels last, a float32 torch
    tensor (a symbolic or numpy input takes Keras' path)."""
    if not _ON_TORCH or data_format != "channels_last":
        return False
    import torch

    return isinstance(inputs, torch.Tensor) and inputs.dtype == torch.float32


def _torch_value(x):
    """The torch tensor behind a Keras variable, or x itself (already a tensor on this path).
    keras.ops.convert_to_tensor does the same with a structure check per call; this path runs
    for every convolution of every step."""
    return x.value if isinstance(x, keras.Variable) else x


def same_padding(length: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) of "same" padding along one axis, as Keras and TensorFlow pad: the extra
    pixel of an odd total goes after."""
    effective = (kernel - 1) * dilation + 1
    out = -(-length // stride)
    total = max(0, (out - 1) * stride + effective - length)
    return total // 2, total - total // 2


def torch_kernel(kernel, owner=None):
    """Keras' (kh, kw, C / groups, F) kernel as torch's (F, C / groups, kh, kw) weight.

    A permuted view while autograd records (training: the weight must stay on the graph; one
    copy per step happens inside the convolution either way). With autograd off (prediction,
    validation) and an `owner` layer, the contiguous weight is kept on the owner and reused
    until the kernel changes (torch's version counter counts every in-place write: optimizer
    steps, assign, load_weights): otherwise every forward copied every kernel into that layout
    (measured: ~110 aten::copy_ per EfficientNetV2B0 forward, ~7% of its time).
    """
    import torch

    from keras.src.backend.common.stateless_scope import in_stateless_scope

    source = _torch_value(kernel)
    if owner is None or torch.is_grad_enabled() or in_stateless_scope():
        return source.permute(3, 2, 0, 1)
    base = source._base if source._base is not None else source  # the variable behind a reshape
    if (type(base) is not torch.nn.Parameter or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()):
        # Tracing (ONNX export, torch.compile) sees fake or functional tensors, which must not
        # be kept (the next prediction would return one), and the traced graph must read the
        # weight itself, not a copy made outside it.
        return source.permute(3, 2, 0, 1)
    cached = owner.__dict__.get("_ich_torch_kernel")
    if cached is None or cached[0] is not base or cached[1] != base._version:
        weight = source.permute(3, 2, 0, 1).contiguous()
        if type(weight) is not torch.Tensor:  # made under a tracing mode: use once, keep not
            return weight
        # __dict__ directly: neither Keras' attribute tracking nor torch's module registration
        # should see a derived copy (it is not a weight, and it is never saved).
        cached = (base, base._version, weight)
        owner.__dict__["_ich_torch_kernel"] = cached
    return cached[2]


def torch_conv2d(inputs, weight, strides, padding: str, dilation_rate, bias=None):
    """Channels-last 2-D convolution on torch without layout copies.

    inputs (N, H, W, C), weight (F, C / groups, kh, kw) (torch_kernel), bias (F,) or None;
    returns (N, H', W', F) as keras.ops.conv plus the bias does ("valid" or "same" padding,
    groups from the channel counts). The bias goes into the convolution kernel itself.
    """
    import torch.nn.functional as F

    x = _torch_value(inputs).permute(0, 3, 1, 2)  # a view: NCHW over channels_last memory
    groups = x.shape[1] // weight.shape[1]
    pad = (0, 0)
    if padding == "same":
        (top, bottom), (left, right) = (
            same_padding(x.shape[2 + i], weight.shape[2 + i], strides[i], dilation_rate[i])
            for i in range(2))
        if (top, left) == (bottom, right):
            pad = (top, left)
        else:
            x = F.pad(x, (left, right, top, bottom))
    y = F.conv2d(x, weight, None if bias is None else _torch_value(bias), tuple(strides), pad,
                 tuple(dilation_rate), groups)
    return y.permute(0, 2, 3, 1)     # a view again when y is channels_last (the usual case)


@keras.saving.register_keras_serializable(package="ich")
class FastConv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D with a copy-free convolution on torch (see the block comment above)."""

    def convolution_op(self, inputs, kernel):
        """The convolution of `inputs` with `kernel`; Keras' own off the torch fast path."""
        if not _torch_fast(inputs, self.data_format):
            return super().convolution_op(inputs, kernel)
        return torch_conv2d(inputs, torch_kernel(kernel), self.strides, self.padding,
                            self.dilation_rate)

    def call(self, inputs):
        """Convolution, bias and activation, as Keras' Conv2D.call computes them (the bias
        inside torch's convolution instead of Keras' reshape and add)."""
        if not _torch_fast(inputs, self.data_format):
            return super().call(inputs)
        outputs = torch_conv2d(inputs, torch_kernel(self.kernel, self), self.strides, self.padding,
                               self.dilation_rate, self.bias if self.use_bias else None)
        if self.activation is not None:
            return self.activation(outputs)
        return outputs


@keras.saving.register_keras_serializable(package="ich")
class FastDepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """keras.layers.DepthwiseConv2D with a copy-free convolution on torch."""

    def grouped_kernel(self):
        """The kernel as a grouped convolution's, Keras' own reshape: (kh, kw, C, M) ->
        (kh, kw, 1, C * M), a torch view of the variable."""
        kh, kw, channels, multiplier = self.kernel.shape
        return self.kernel.value.reshape(kh, kw, 1, channels * multiplier)

    def call(self, inputs):
        """Depthwise convolution, bias and activation, as the Keras layer computes them."""
        if not _torch_fast(inputs, self.data_format):
            return super().call(inputs)
        outputs = torch_conv2d(inputs, torch_kernel(self.grouped_kernel(), self), self.strides,
                               self.padding,
                               self.dilation_rate, self.bias if self.use_bias else None)
        if self.activation is not None:
            return self.activation(outputs)
        return outputs


@keras.saving.register_keras_serializable(package="ich")
class FastBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization through torch's fused kernel on torch.

    Same moving-average update as Keras (momentum, biased batch variance); the batch statistics
    come out of the fused forward (torch.native_batch_norm's saved mean and inverse std).
    """

    def call(self, inputs, training=None, mask=None):
        """Normalise `inputs`; Keras' own code off the torch fast path."""
        if (mask is not None or self.renorm or self.synchronized or not _torch_fast(inputs)
                or self.axis not in (-1, len(inputs.shape) - 1)):
            return super().call(inputs, training=training, mask=mask)
        import torch

        x = inputs.movedim(-1, 1)  # a view: channels on axis 1, as torch's kernels expect
        gamma = self.gamma.value if self.scale else None
        beta = self.beta.value if self.center else None
        if training and self.trainable:
            y, mean, invstd = torch.native_batch_norm(x, gamma, beta, None, None, True, 0.0,
                                                      self.epsilon)
            with torch.no_grad():
                variance = invstd.pow(-2).sub_(self.epsilon)
                self._update_moving(self.moving_mean, mean)
                self._update_moving(self.moving_variance, variance)
        else:
            y = torch.nn.functional.batch_norm(x, self.moving_mean.value, self.moving_variance.value,
                                               gamma, beta, False, 0.0, self.epsilon)
        y = y.movedim(1, -1)
        return y if self.compute_dtype == "float32" else keras.ops.cast(y, self.compute_dtype)


    def _update_moving(self, variable, batch_value):
        """variable <- momentum * variable + (1 - momentum) * batch_value. In place (one lerp_
        kernel) when the variable is stateful; a stateless scope (Keras' stateless_call) gets
        the update through assign, which records it there."""
        from keras.src.backend.common.stateless_scope import in_stateless_scope

        if in_stateless_scope():
            variable.assign(variable.value * self.momentum + batch_value * (1.0 - self.momentum))
        else:
            variable.value.lerp_(batch_value, 1.0 - self.momentum)


@keras.saving.register_keras_serializable(package="ich")
class FastDense(keras.layers.Dense):
    """keras.layers.Dense with its bias inside the matrix product on torch.

    Keras computes matmul, then adds the bias as a second full pass over the output; torch's
    linear (addmm) adds it inside the product, as timm's nn.Linear does. ConvNeXt runs two
    dense layers per block over every pixel, so that add is one more pass over its largest
    tensors in every block. Same values within float rounding.
    """

    def call(self, inputs, training=None):
        """inputs @ kernel + bias, then the activation; Keras' own code off the torch fast path
        (and for LoRA or quantized layers, whose kernel Keras composes)."""
        if self.lora_enabled or self.quantization_mode is not None or not _torch_fast(inputs):
            return super().call(inputs, training=training)
        import torch

        bias = _torch_value(self.bias) if self.bias is not None else None
        outputs = torch.nn.functional.linear(inputs, _torch_value(self._kernel).t(), bias)
        if self.activation is not None:
            return self.activation(outputs)
        return outputs


@keras.saving.register_keras_serializable(package="ich")
class FastDropout(keras.layers.Dropout):
    """keras.layers.Dropout with its seeded mask applied in one multiplication on torch.

    Keras' torch dropout with a seed or a noise shape (EfficientNetV2's stochastic depth: one
    draw per image, noise shape (N, 1, 1, 1), on every residual block) divides the whole
    input by the keep probability, fills a tensor of zeros as large, and selects between them
    (torch.where); its backward selects again. This draws the same mask from the same
    generator (torch.bernoulli on Keras' seed stream) and multiplies the input by mask / keep,
    broadcast: one pass over the feature map forward and one backward. Same values within
    float rounding (x * (1 / keep) against x / keep), the same random stream.
    """

    def call(self, inputs, training=False):
        """inputs x mask / keep when training; Keras' own code off the torch fast path and for
        the unseeded case (there Keras already calls torch's fused dropout)."""
        if not (training and 0.0 < self.rate < 1.0) or not _torch_fast(inputs) or not self._seeded():
            return super().call(inputs, training=training)
        import torch

        from keras.src.backend.torch.random import _get_concrete_noise_shape, torch_seed_generator

        keep = 1.0 - self.rate
        shape = _get_concrete_noise_shape(inputs, self.noise_shape)
        draws = torch.full(shape, keep, device=inputs.device)
        mask = torch.bernoulli(draws, generator=torch_seed_generator(self.seed_generator))
        return inputs * mask.mul_(1.0 / keep)

    def _seeded(self) -> bool:
        """Keras' test for its seeded path (keras.src.backend.torch.random.dropout): a noise
        shape, or a seed generator made with a seed."""
        return self.noise_shape is not None or self.seed_generator._initial_seed is not None


def can_fold(conv, bn) -> bool:
    """True when BatchNorm `bn`, applied to the output of convolution `conv` alone, can be
    folded into it for prediction: ich's fast twins, channels last, no activation between."""
    return (type(conv) in (FastConv2D, FastDepthwiseConv2D) and type(bn) is FastBatchNormalization
            and conv.data_format == "channels_last" and conv.activation in (None, keras.activations.linear)
            and not bn.renorm and not bn.synchronized and bn.axis in (-1, 3))


def folded_conv_bn(conv, bn, inputs):
    """bn(conv(inputs)) in inference mode as one convolution: the kernel scaled per output
    channel by gamma / sqrt(moving_variance + epsilon), the bias (conv bias - moving_mean) x
    that scale + beta. The same function within float rounding; what ONNX runtimes and
    TensorRT do to every such pair. For prediction only (autograd off): the folded weights are
    kept on `conv` until any of the weights they come from changes (version counters)."""
    import torch

    kernel = conv.grouped_kernel() if isinstance(conv, FastDepthwiseConv2D) else conv.kernel.value
    sources = [conv.kernel.value, bn.moving_mean.value, bn.moving_variance.value]
    sources += [v.value for v, used in ((bn.gamma, bn.scale), (bn.beta, bn.center),
                                        (getattr(conv, "bias", None), conv.use_bias)) if used]
    key = tuple((id(t), t._version) for t in sources)
    cached = conv.__dict__.get("_ich_folded")
    if cached is None or cached[0] != key:
        scale = torch.rsqrt(bn.moving_variance.value + bn.epsilon)
        if bn.scale:
            scale = scale * bn.gamma.value
        bias = -bn.moving_mean.value * scale
        if bn.center:
            bias = bias + bn.beta.value
        if conv.use_bias:
            bias = bias + conv.bias.value * scale
        weight = kernel.permute(3, 2, 0, 1) * scale[:, None, None, None]
        # (sources kept: their ids stay unique while the cache holds them)
        cached = (key, weight.contiguous(), bias, sources)
        conv.__dict__["_ich_folded"] = cached  # past Keras' tracking and torch's registration
    return torch_conv2d(inputs, cached[1], conv.strides, conv.padding, conv.dilation_rate, cached[2])


# Keras layer class -> its fast twin, swapped in by `with_fast_layers`.
FAST_LAYERS = {keras.layers.Conv2D: FastConv2D, keras.layers.DepthwiseConv2D: FastDepthwiseConv2D,
               keras.layers.BatchNormalization: FastBatchNormalization, keras.layers.Dense: FastDense,
               keras.layers.Dropout: FastDropout}


def with_fast_layers(model: keras.Model) -> keras.Model:
    """`model` itself, each layer of a FAST_LAYERS class (at any depth) switched in place to its
    fast twin. The twins are subclasses that override only how the layer computes, so weights,
    config and graph stay as they are; switching costs nothing, where cloning the network
    would rebuild it (seconds per backbone)."""
    for layer in _walk(model):
        fast = FAST_LAYERS.get(type(layer))
        if fast is not None:
            layer.__class__ = fast
    return model


def _walk(layer):
    """`layer` and, recursively, every layer nested inside it."""
    yield layer
    for sub in getattr(layer, "layers", []):
        yield from _walk(sub)
