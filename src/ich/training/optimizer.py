"""The optimizer every trained stage uses: Keras' Adam, with torch's fused kernel on torch.

In: a learning rate (a float or a Keras schedule). Out: a `keras.optimizers.Adam`, the class
saved files and checkpoints record, with the same variables (momentums, velocities,
iterations) and the same update within float rounding. On the torch backend its update runs
as torch's fused Adam (`torch._fused_adam_`, what `torch.optim.Adam(fused=True)` calls): one
pass over each weight, its gradient and both moments, where Keras' torch Adam issues ten
`torch._foreach_*` operators, and each of them, on CPU, loops over the ~250 weights of a
backbone (bench/profile_train.py: about 40 ms of a 530 ms EfficientNetV2B0 step at 128 px,
batch 16, against a few for the fused pass). Other backends get Keras' Adam unchanged.

The two formulas differ only in where epsilon sits. Keras:
    w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
torch:
    w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps')
which is Keras' update when eps' = eps / sqrt(1 - b2^t), passed each step.
"""

from __future__ import annotations

import math
import types

import keras


def adam(learning_rate) -> keras.optimizers.Adam:
    """A Keras Adam at `learning_rate` whose update, on torch, is the fused kernel (see the
    module docstring). The override is an attribute of this object, not of its class: the
    saved optimizer is Keras' own and loads on every backend."""
    optimizer = keras.optimizers.Adam(learning_rate)
    if keras.backend.backend() == "torch":
        optimizer._parallel_update_step = types.MethodType(_fused_update, optimizer)
    return optimizer


def _fused_update(self, grads, variables, learning_rate):
    """Keras' torch Adam `_parallel_update_step` as one fused kernel call where it applies
    (dense tensors of one dtype and device, no amsgrad); Keras' own otherwise."""
    import torch

    params = [v.value for v in variables]
    if self.amsgrad or not _fusable(params, grads):
        return type(self)._parallel_update_step(self, grads, variables, learning_rate)
    moments = [self._momentums[self._get_variable_index(v)].value for v in variables]
    velocities = [self._velocities[self._get_variable_index(v)].value for v in variables]
    step = float(self.iterations.value) + 1.0  # Keras increments iterations after the update
    correction = math.sqrt(1.0 - float(self.beta_2) ** step)
    # The kernel reads (never writes) each weight's step count: one shared tensor serves all.
    steps = [torch.tensor(step, dtype=torch.float32, device=params[0].device)] * len(params)
    torch._fused_adam_(params, list(grads), moments, velocities, [], steps,
                       lr=float(learning_rate), beta1=float(self.beta_1), beta2=float(self.beta_2),
                       weight_decay=0.0, eps=float(self.epsilon) / correction, amsgrad=False,
                       maximize=False)


def _fusable(params, grads) -> bool:
    """True when torch's fused kernel takes these tensors: all dense and contiguous, one
    floating dtype, one device, gradients alike."""
    first = params[0] if params else None
    if first is None or not first.is_floating_point() or len(grads) != len(params):
        return False
    return all(t is not None and t.layout == first.layout and not t.is_sparse and t.is_contiguous()
               and t.dtype == first.dtype and t.device == first.device
               for t in (*params, *grads))
