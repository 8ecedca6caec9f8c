"""Steps: a model's layer list compiled into the units that ``Sequential`` runs.

A step runs one or more neighbouring layers as one unit, forward and backward
side by side, with fixed types: ``forward(Pending, training, cache) -> Pending``
and ``backward(Pending, sums, after, need_input_grad) -> Pending | None``
(:class:`~breastcnn.nn.parallel.Pending`: an array whose rows its consumer may
still have to write, chunk by chunk). The layers stay separate objects with
their own parameters, state and caches, so a fused forward leaves exactly the
caches that the separate layers would, and any backward range works after it.

The patterns, each handled in one class:

- :class:`ConvBNReLU`: Conv2D, BatchNorm (+ ReLU). Training: the conv computes
  the batch moments of its output chunk by chunk (``after`` hook), the
  BatchNorm's normalisation (+ ReLU) is left pending for the next step.
  Backward: the BatchNorm's input gradient runs in the conv's chunks
  (``before`` hook). ``predict`` compiles these steps further into its own
  plan (``nn/inference.py``: BatchNorm folded into the conv, pools fused).
- :class:`BNReLU`: a BatchNorm (+ ReLU) after anything else: normalisation
  left pending, backward as above.
- :class:`Single`: any other layer on its own; a layer with chunk hooks
  (Conv2D with valid padding, MaxPool2D with pool == stride) writes a pending
  input in its own chunks.

Between steps: a step whose bottom layer takes chunk hooks runs the
``grad_hook()`` of the step below on each chunk of the input gradient it writes
(a BatchNorm's gradient sums, with its ReLU mask, while the chunk is in cache),
and that step gets the hook back as ``sums``. :func:`compile_steps` matches the
patterns once; a layer class that overrides ``forward``/``backward`` of the
class a pattern names runs as a ``Single`` step (visible in ``model.steps``),
since a fused step would skip its override.
"""

from __future__ import annotations

import numpy as np

from breastcnn.nn import functional as F
from breastcnn.nn.layers import BatchNorm, Conv2D, Layer, MaxPool2D, ReLU
from breastcnn.nn.parallel import ChunkResults, Pending

#: layer classes whose forward/backward implement the ``before``/``after`` chunk hooks
_HOOKED_CLASSES = (Conv2D, MaxPool2D)


def _is_plain(layer: Layer, cls: type) -> bool:
    """``layer`` is a ``cls`` running ``cls``'s own forward and backward (a subclass may add to it, not change them)."""
    kind = type(layer)
    return isinstance(layer, cls) and kind.forward is cls.forward and kind.backward is cls.backward


def takes_hooks(layer: Layer) -> bool:
    """Whether ``layer``'s forward/backward take ``before``/``after`` chunk hooks."""
    return any(_is_plain(layer, cls) for cls in _HOOKED_CLASSES) and bool(layer.chunk_hooks)


def _input(x: Pending, hooked: bool) -> tuple[np.ndarray, object]:
    """``(array, before hook)`` for a layer that fills pending rows in its chunks, else the completed array."""
    return x.take() if hooked else (x.complete(), None)


def _channel_moments(out: np.ndarray, a: int, b: int):
    """Moments of output images ``a:b`` (N, H, W, C) per channel, for a BatchNorm's batch statistics."""
    return F.channel_moments(out[a:b].reshape(-1, out.shape[2] * out.shape[3]), out.shape[2])


class Step:
    """Layers ``start .. start+len(layers)-1`` of a model run as one unit.

    ``hooked``: the first layer takes chunk hooks, so forward it writes a pending input in its own
    chunks, and backward it can run the step below's ``grad_hook()`` on its input gradient's chunks.
    """

    hooked = False

    def __init__(self, start: int, *layers: Layer):
        self.start = start
        self.layers = layers

    def forward(self, x: Pending, training: bool, cache: bool) -> Pending:
        raise NotImplementedError

    def backward(
        self, grad: Pending, sums: ChunkResults | None, after: ChunkResults | None, need_input_grad: bool
    ) -> Pending | None:
        """dL/d(output of this step) -> dL/d(input of this step), filling the layers' ``grads``.

        sums: this step's own ``grad_hook()``, already run by the step above on every chunk of
        ``grad``. after: the step below's hook, to run on each chunk of the input gradient (only
        passed to a ``hooked`` step). Returns None when not ``need_input_grad``.
        """
        raise NotImplementedError

    def grad_hook(self) -> ChunkResults | None:
        """A hook for the step above to run on each chunk of this step's output gradient, or None."""
        return None

    def __repr__(self) -> str:
        names = ", ".join(layer.name or type(layer).__name__ for layer in self.layers)
        return f"{type(self).__name__}({names})"


class Single(Step):
    """One layer on its own."""

    def __init__(self, start: int, layer: Layer):
        super().__init__(start, layer)
        self.layer = layer
        self.hooked = takes_hooks(layer)

    def forward(self, x, training, cache):
        if self.hooked:
            array, before = x.take()
            return Pending(self.layer.forward(array, training, cache, before=before))
        return Pending(self.layer.forward(x.complete(), training, cache))

    def backward(self, grad, sums, after, need_input_grad):
        if self.hooked:
            array, before = grad.take()
            dx = self.layer.backward(array, need_input_grad, before=before, after=after)
        else:
            dx = self.layer.backward(grad.complete(), need_input_grad)
        return None if dx is None else Pending(dx)


class BNReLU(Step):
    """BatchNorm, then optionally a ReLU fused into the same passes (``relu`` None: the BatchNorm alone).

    Forward leaves the normalisation (+ ReLU) pending for the next step; backward leaves the input
    gradient pending for the step below, and takes its gradient sums from the step above when that
    step computed them (``sums``).
    """

    def __init__(self, start: int, bn: BatchNorm, relu: ReLU | None = None):
        super().__init__(start, *((bn,) if relu is None else (bn, relu)))
        self.bn = bn
        self.relu = relu

    def forward(self, x, training, cache):
        return self.normalise(x.complete(), training, cache)

    def normalise(self, x: np.ndarray, training: bool, cache: bool, moments=None) -> Pending:
        """BatchNorm (+ ReLU) of a complete ``x``, output pending; the ReLU's cache is its output."""
        out = self.bn.forward_deferred(x, training, cache, moments=moments, relu=self.relu is not None)
        if cache and self.relu is not None:
            self.relu.cache_output(out.array)
        return out

    def _relu_out(self):
        return None if self.relu is None else self.relu.cached_output()

    def grad_hook(self):
        return self.bn.grad_sums_hook(self._relu_out())

    def backward(self, grad, sums, after, need_input_grad):
        return self.bn.backward_deferred(grad.complete(), need_input_grad, relu_out=self._relu_out(), sums=sums)


class ConvBNReLU(Step):
    """Conv2D, BatchNorm, then optionally a ReLU (``relu`` None: Conv2D + BatchNorm).

    Forward: the conv, with the batch moments of its output computed in its chunks when the BatchNorm
    uses batch statistics, then the BatchNorm (+ ReLU) left pending. Backward: the BatchNorm's input
    gradient is written in the conv's chunks. (``predict`` runs its own plan, ``nn/inference.py``, with
    the BatchNorm folded into the conv's weights.)
    """

    def __init__(self, start: int, conv: Conv2D, bn: BatchNorm, relu: ReLU | None = None):
        super().__init__(start, *((conv, bn) if relu is None else (conv, bn, relu)))
        self.conv = conv
        self.norm = BNReLU(start + 1, bn, relu)
        self.hooked = takes_hooks(conv)

    def forward(self, x, training, cache):
        array, before = _input(x, self.hooked)
        moments = ChunkResults(_channel_moments) if self.norm.bn.uses_batch_statistics(training) else None
        y = self.conv.forward(array, training, cache, before=before, after=moments)
        combined = None if moments is None else F.combine_moments(moments.ordered())
        return self.norm.normalise(y, training, cache, moments=combined)

    def grad_hook(self):
        return self.norm.grad_hook()

    def backward(self, grad, sums, after, need_input_grad):
        g = self.norm.backward(grad, sums, None, True)
        array, before = _input(g, self.hooked)
        dx = self.conv.backward(array, need_input_grad, before=before, after=after)
        return None if dx is None else Pending(dx)


def compile_steps(layers: list[Layer], start: int = 0, fuse: bool = True) -> list[Step]:
    """The steps that run ``layers`` (model indices from ``start``); ``fuse=False``: one Single per layer.

    Patterns, first match wins: Conv2D BatchNorm ReLU, Conv2D BatchNorm, BatchNorm ReLU, BatchNorm.
    """
    steps: list[Step] = []
    i, n = 0, len(layers)

    def at(k: int, cls: type):
        return layers[k] if fuse and k < n and _is_plain(layers[k], cls) else None

    while i < n:
        index = start + i
        conv, bn = at(i, Conv2D), at(i + 1, BatchNorm)
        if conv is not None and bn is not None:
            relu = at(i + 2, ReLU)
            steps.append(ConvBNReLU(index, conv, bn, relu))
            i += 3 if relu is not None else 2
        elif at(i, BatchNorm) is not None:
            relu = at(i + 1, ReLU)
            steps.append(BNReLU(index, layers[i], relu))
            i += 2 if relu is not None else 1
        else:
            steps.append(Single(index, layers[i]))
            i += 1
    return steps


def run_forward(
    steps: list[Step], x: np.ndarray, training: bool, cache: bool, activations: list | None = None
) -> np.ndarray:
    """Output of ``steps`` for input ``x``; ``activations``: a list that gets each step's output."""
    flow = Pending(x)
    for step in steps:
        flow = step.forward(flow, training, cache)
        if activations is not None:
            activations.append(flow.complete())
    return flow.complete()


def run_backward(steps: list[Step], grad: np.ndarray, need_input_grad: bool) -> np.ndarray | None:
    """dL/d(input of ``steps[0]``) from dL/d(output of ``steps[-1]``) (None when not ``need_input_grad``)."""
    flow: Pending | None = Pending(grad)
    sums = None
    for k in range(len(steps) - 1, -1, -1):
        step = steps[k]
        after = steps[k - 1].grad_hook() if k and step.hooked else None
        flow = step.backward(flow, sums, after, need_input_grad or k > 0)
        sums = after
    return None if flow is None else flow.complete()


__all__ = ["Step", "Single", "BNReLU", "ConvBNReLU", "compile_steps", "run_forward", "run_backward", "takes_hooks"]
