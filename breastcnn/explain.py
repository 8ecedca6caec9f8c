"""Look inside a classifier: feature maps and Grad-CAM, as arrays and as PNGs.

Grad-CAM (Selvaraju et al. 2017) for class ``c`` at a conv layer with
activations ``A`` of shape ``(H', W', K)``::

    alpha_k = mean_{i,j} d logit_c / d A[i, j, k]        # one weight per channel
    cam     = ReLU(sum_k alpha_k * A[:, :, k])           # (H', W')
    heatmap = cam / max(cam)                             # in [0, 1] (all zeros if cam == 0)

``logit_c`` is the pre-softmax score, so the gradient is not squashed by the
softmax when the model is confident.

- NumPy models (``framework == "numpy"``): forward in inference mode (BN uses
  its moving statistics, dropout off) through the layers, then back-propagate a
  one-hot at the logits down to the chosen layer's output. No weight update.
- Keras models: ``tf.GradientTape`` on the chosen layer's output
  (``KerasClassifier.gradcam_layer``: VGG16 ``block5_conv3``, ResNet50
  ``conv5_block3_out``, custom-keras the block :func:`choose_gradcam_layer` picks).

The default Grad-CAM layer is ``model.gradcam_layer`` when the model has one
(VGG16, ResNet50, custom-keras), else :func:`choose_gradcam_layer` (in
``models/structure.py``, which the models layer uses too): the output
of the last conv *block* whose map is at least :data:`MIN_GRADCAM_GRID` cells
across (custom-keras gets its layer by the same rule, so a NumPy model and its
Keras export explain the same layer). Feature maps show each conv block's
output too: the conv plus the BatchNorm/activation layers right after it (what
a Keras conv with a fused ReLU outputs).

Library code: returns arrays or writes PNGs (matplotlib Agg, atomic writes);
never prints.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from breastcnn.data.images import decode_image, preprocess
from breastcnn.data.stain import normalise_batch
from breastcnn.errors import UserInputError
from breastcnn.fsutil import atomic_write
from breastcnn.models.classifier import capabilities, framework_of, model_spec
from breastcnn.models.structure import MIN_GRADCAM_GRID, choose_gradcam_layer, conv_blocks, keras_model, layer_index

__all__ = [
    "CLASS_CHOICES",
    "MIN_GRADCAM_GRID",
    "cam_from_parts",
    "choose_gradcam_layer",
    "conv_blocks",
    "default_gradcam_layer",
    "explain_image",
    "feature_maps",
    "gradcam",
    "gradcam_parts",
    "normalise_maps",
    "overlay",
    "plot_feature_grid",
    "plot_gradcam",
    "plot_input",
    "resolve_class",
    "tile_maps",
    "upsample_heatmap",
]


# --------------------------------------------------------------------- layers
def default_gradcam_layer(model) -> str:
    """Name of the layer Grad-CAM uses by default (see the module docstring)."""
    layer = getattr(model, "gradcam_layer", None)
    if isinstance(layer, str) and layer:
        return layer
    return choose_gradcam_layer(model)


def _check_input(model, x: np.ndarray) -> np.ndarray:
    """``x`` as a float ``(1, H, W, 3)`` batch (float64 kept for gradient checks); accepts ``(H, W, 3)``."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1:
        raise UserInputError(f"expected one preprocessed image (H, W, C) or (1, H, W, C), got shape {x.shape}")
    return x


# ---------------------------------------------------------------- NumPy side
def _numpy_gradcam_parts(model, x: np.ndarray, class_index: int | None, layer: str):
    """Activations ``(H', W', K)``, d logit_c / d activations (same shape), logits ``(C,)``, class.

    One inference-mode forward keeping every layer's output and cache
    (``Sequential.forward(return_activations=True)``), then ``Sequential.backward``
    of a one-hot at the logits down to the output of ``layer``. The layers'
    ``grads`` are restored afterwards, so nothing about the model changes.
    """
    index = layer_index(model, layer)
    top = model.logits_index
    if index > top:
        raise UserInputError(f"--layer {layer!r} comes after the logits; pick a conv layer")
    _, outputs = model.forward(x, training=False, return_activations=True)
    activations, logits = outputs[index], outputs[top]
    if activations.ndim != 4:
        raise UserInputError(f"layer {layer!r} has output shape {activations.shape[1:]}, not a (H, W, C) map")
    c = int(np.argmax(logits[0])) if class_index is None else _check_class(class_index, logits.shape[1])
    grad = np.zeros_like(logits)
    grad[0, c] = 1.0
    if index < top:
        saved = [{k: v.copy() for k, v in layer_.grads.items()} for layer_ in model.layers]
        try:
            grad = model.backward(grad, start=top, stop=index + 1)  # dlogit_c / d(output of layer index)
        finally:
            for layer_, grads in zip(model.layers, saved, strict=True):
                layer_.grads = grads
    return activations[0], grad[0], logits[0], c


def _check_class(class_index: int, num_classes: int) -> int:
    c = int(class_index)
    if not 0 <= c < num_classes:
        raise UserInputError(f"--class index must be in [0, {num_classes - 1}], got {class_index}")
    return c


# ---------------------------------------------------------------- Keras side
def _keras_logits_model(kmodel, layer: str):
    """``keras.Model`` mapping the input to ``[activations, logits]``.

    The logits are the input of a final softmax: either a separate Softmax /
    Activation layer, or recomputed from a final Dense whose activation is softmax.
    """
    import keras

    try:
        target = kmodel.get_layer(layer)
    except ValueError:
        names = [lay.name for lay in kmodel.layers]
        raise UserInputError(f"--layer: no layer named {layer!r} in the model; layers: {', '.join(names)}") from None
    last = kmodel.layers[-1]
    activation = getattr(last, "activation", None)
    act_name = getattr(activation, "__name__", "")
    if type(last).__name__ == "Softmax" or (type(last).__name__ == "Activation" and act_name == "softmax"):
        return keras.Model(_single_input(kmodel), [target.output, last.input]), None
    if type(last).__name__ == "Dense" and act_name == "softmax":
        return keras.Model(_single_input(kmodel), [target.output, last.input]), last
    return keras.Model(_single_input(kmodel), [target.output, kmodel.outputs[0]]), None


def _keras_gradcam_parts(model, x: np.ndarray, class_index: int | None, layer: str):
    import tensorflow as tf

    kmodel = keras_model(model)
    grad_model, dense = _keras_logits_model(kmodel, layer)
    xt = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        activations, features = grad_model(xt, training=False)
        if dense is not None:  # Dense(softmax): logits = features @ kernel + bias
            logits = tf.matmul(features, dense.kernel)
            if dense.use_bias:
                logits = logits + dense.bias
        else:
            logits = features
        logits_np = logits.numpy()
        c = int(np.argmax(logits_np[0])) if class_index is None else _check_class(class_index, logits_np.shape[1])
        score = logits[:, c]
    grads = tape.gradient(score, activations)
    return activations.numpy()[0], grads.numpy()[0], logits_np[0], c


# ------------------------------------------------------------------ Grad-CAM
def gradcam_parts(model, x_preprocessed: np.ndarray, class_index: int | None = None, layer: str | None = None) -> dict:
    """The pieces of Grad-CAM for one image.

    Args:
        model: NumPy ``Sequential``, ``KerasClassifier`` or ``keras.Model``.
        x_preprocessed: ``(H, W, 3)`` or ``(1, H, W, 3)`` float32, already
            preprocessed with ``model.meta["preprocess"]``.
        class_index: the class to explain; ``None`` -> the predicted class.
        layer: layer name; ``None`` -> :func:`default_gradcam_layer`.

    Returns:
        dict with ``activations`` ``(H', W', K)``, ``gradients`` (d logit_c /
        d activations, same shape), ``logits`` ``(C,)``, ``class_index``, ``layer``.
    """
    x = _check_input(model, x_preprocessed)
    layer = layer or default_gradcam_layer(model)
    if _framework(model) == "numpy":
        acts, grads, logits, c = _numpy_gradcam_parts(model, x, class_index, layer)
    else:
        acts, grads, logits, c = _keras_gradcam_parts(model, x, class_index, layer)
    return {"activations": acts, "gradients": grads, "logits": logits, "class_index": c, "layer": layer}


def cam_from_parts(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM from activations and gradients ``(H', W', K)`` -> heatmap ``(H', W')`` in [0, 1]."""
    weights = gradients.mean(axis=(0, 1))  # (K,)
    cam = np.maximum(np.tensordot(activations, weights, axes=([2], [0])), 0.0)
    peak = float(cam.max()) if cam.size else 0.0
    if not np.isfinite(peak) or peak <= 0.0:
        return np.zeros(cam.shape, dtype=np.float32)  # nothing supports the class
    return (cam / peak).astype(np.float32)


def gradcam(model, x_preprocessed: np.ndarray, class_index: int | None = None, layer: str | None = None) -> np.ndarray:
    """Grad-CAM heatmap ``(H', W')`` float32 in [0, 1] at the layer's resolution.

    See :func:`gradcam_parts` for the arguments; :func:`upsample_heatmap` brings
    it to the input size.
    """
    parts = gradcam_parts(model, x_preprocessed, class_index=class_index, layer=layer)
    return cam_from_parts(parts["activations"], parts["gradients"])


def upsample_heatmap(heatmap: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a ``(h, w)`` heatmap in [0, 1] to ``size`` (``(H, W)`` or ``S``)."""
    height, width = (size, size) if isinstance(size, int) else size
    image = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F")
    resized = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32)
    return np.clip(resized, 0.0, 1.0)


def overlay(image_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.6, cmap: str = "jet") -> np.ndarray:
    """Blend a heatmap (any size, [0, 1]) over an RGB image ``(H, W, 3)`` uint8 -> uint8.

    The colour's weight grows with the heat (``alpha * heat``): where the model does not look the
    tissue shows as it is, so the hot regions stand out rather than a uniform tint.
    """
    from matplotlib import colormaps

    image = np.asarray(image_uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise UserInputError(f"overlay expects an RGB image (H, W, 3), got shape {image.shape}")
    heat = upsample_heatmap(heatmap, image.shape[:2])
    colours = colormaps[cmap](heat)[..., :3] * 255.0
    weight = (alpha * heat)[..., None]
    blended = (1.0 - weight) * image.astype(np.float32) + weight * colours
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


# -------------------------------------------------------------- feature maps
def feature_maps(model, x_preprocessed: np.ndarray, layers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Activations ``(H', W', K)`` of each conv block for one image, in model order.

    Keys are conv layer names (``layers`` may name a conv or any 4-D layer);
    values are the block outputs (after BatchNorm/ReLU) in inference mode.
    """
    x = _check_input(model, x_preprocessed)
    blocks = conv_blocks(model)
    if layers:
        known = {conv: out for conv, out in blocks}
        wanted = []
        for name in layers:
            wanted.append((name, known.get(name, name)))
    else:
        wanted = blocks
    if not wanted:
        raise UserInputError(f"model {_arch(model)!r} has no conv layer to show")
    if _framework(model) == "numpy":
        index = {name: layer_index(model, out) for name, out in wanted}
        outputs = model.activations(x, training=False)
        result = {}
        for name, i in index.items():
            if outputs[i].ndim != 4:
                raise UserInputError(f"--layers: {name!r} has output shape {outputs[i].shape[1:]}, not (H, W, C)")
            result[name] = outputs[i][0]
        return result
    import keras

    kmodel = keras_model(model)
    outputs = []
    for name, out in wanted:
        try:
            outputs.append(kmodel.get_layer(out).output)
        except ValueError:
            raise UserInputError(f"--layers: no layer named {name!r} in the model") from None
    values = keras.Model(_single_input(kmodel), outputs)(x, training=False)
    if not isinstance(values, (list, tuple)):
        values = [values]
    result = {}
    for (name, _), value in zip(wanted, values, strict=True):
        arr = np.asarray(value)
        if arr.ndim != 4:
            raise UserInputError(f"--layers: {name!r} has output shape {arr.shape[1:]}, not (H, W, C)")
        result[name] = arr[0]
    return result


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """Scale each channel of ``(H, W, K)`` to [0, 1] independently (flat maps -> 0)."""
    maps = np.asarray(maps, dtype=np.float32)
    low = maps.min(axis=(0, 1), keepdims=True)
    span = maps.max(axis=(0, 1), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


# --------------------------------------------------------------------- plots
def _save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Render a figure to PNG in memory, then write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def _figure(width: float, height: float):
    """A figure on the Agg canvas (object API: no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def tile_maps(maps: np.ndarray, pad: int = 1) -> np.ndarray:
    """Tile ``(H, W, K)`` maps (each normalised to [0, 1]) into one ``(rows*(H+pad), cols*(W+pad))``
    mosaic, row-major, NaN in the padding and empty cells (drawn as background)."""
    maps = normalise_maps(maps)
    height, width, count = maps.shape
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    mosaic = np.full((rows * (height + pad) - pad, cols * (width + pad) - pad), np.nan, dtype=np.float32)
    for k in range(count):
        r, c = divmod(k, cols)
        top, left = r * (height + pad), c * (width + pad)
        mosaic[top : top + height, left : left + width] = maps[:, :, k]
    return mosaic


def plot_feature_grid(maps: np.ndarray, path: str | Path, title: str, cmap: str = "viridis") -> Path:
    """One PNG with every filter's map of a ``(H, W, K)`` activation, each normalised to [0, 1].

    Drawn as a single mosaic image (filters row-major from the top left), so a
    2048-channel layer costs one ``imshow``, not 2048 axes.
    """
    mosaic = tile_maps(maps, pad=max(1, maps.shape[0] // 16))
    aspect = mosaic.shape[1] / mosaic.shape[0]
    fig = _figure(min(14.0, max(4.0, 7.0 * aspect)), 7.0 if aspect <= 2 else 7.0 / aspect * 2 + 1)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor("white")
    ax.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    return _save_figure(fig, path)


def plot_input(
    image_uint8: np.ndarray, x_preprocessed: np.ndarray, path: str | Path, title: str, mode: str = "caffe"
) -> Path:
    """The resized RGB input beside the preprocessed array (each channel rescaled for display)."""
    pre = np.asarray(x_preprocessed, dtype=np.float32)
    if pre.ndim == 4:
        pre = pre[0]
    shown = normalise_maps(pre[..., ::-1] if mode == "caffe" else pre)  # caffe is BGR: show as RGB
    fig = _figure(7.0, 3.8)
    panels = ((image_uint8, "input (RGB, resized)"), (shown, "preprocessed (per channel rescaled)"))
    for i, (img, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(img)
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return _save_figure(fig, path)


def plot_gradcam(
    image_uint8: np.ndarray, heatmap: np.ndarray, path: str | Path, title: str, alpha: float = 0.6
) -> Path:
    """Input, heatmap and overlay side by side, with a colour bar."""
    blended = overlay(image_uint8, heatmap, alpha=alpha)
    fig = _figure(10.5, 3.8)
    ax = fig.add_subplot(1, 3, 1)
    ax.imshow(image_uint8)
    ax.set_title("input", fontsize=8)
    ax = fig.add_subplot(1, 3, 2)
    shown = ax.imshow(upsample_heatmap(heatmap, image_uint8.shape[:2]), cmap="jet", vmin=0.0, vmax=1.0)
    ax.set_title(f"Grad-CAM ({heatmap.shape[0]}x{heatmap.shape[1]}, upsampled)", fontsize=8)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ax = fig.add_subplot(1, 3, 3)
    ax.imshow(blended)
    ax.set_title("overlay", fontsize=8)
    for ax in fig.axes[:1] + fig.axes[1:2] + fig.axes[-1:]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return _save_figure(fig, path)


# ------------------------------------------------------------------- helpers
def _framework(model) -> str:
    """``"numpy"`` for Sequential, ``"keras"`` for KerasClassifier and plain keras.Model.

    A model without layer outputs (an ONNX export holds only the folded inference graph: no layer outputs,
    no gradients) is refused."""
    if not capabilities(model).layer_outputs:
        raise UserInputError(
            "feature maps and Grad-CAM need the NumPy .npz or Keras .keras model; an ONNX "
            "export holds only the inference graph (use the model it was exported from)"
        )
    return framework_of(model)


def _arch(model) -> str:
    return str((getattr(model, "meta", None) or {}).get("arch", type(model).__name__))


# ------------------------------------------------------------ one image, all plots
CLASS_CHOICES = ("predicted", "benign", "malignant")


def resolve_class(model, which: str | int | None, probabilities: np.ndarray) -> int:
    """``"predicted"``/``None`` -> argmax; a class name -> its index in ``model.spec.classes``."""
    if which is None or which == "predicted":
        return int(np.argmax(probabilities))
    if isinstance(which, (int, np.integer)):
        return _check_class(int(which), len(probabilities))
    classes = list(model_spec(model).classes)
    if which not in classes:
        raise UserInputError(f"--class must be predicted or one of {', '.join(classes)}, got {which!r}")
    return classes.index(which)


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def explain_image(
    model,
    image_path: str | Path,
    out_dir: str | Path,
    layers: Sequence[str] | None = None,
    with_gradcam: bool = False,
    which_class: str | int | None = "predicted",
) -> dict:
    """Write the feature-map PNGs (and the Grad-CAM overlay) of one image into ``out_dir``.

    Files: ``input.png`` (resized input and the preprocessed array),
    ``NN_<conv layer>.png`` (one grid per conv layer, every filter, each map
    normalised) and, with ``with_gradcam``, ``gradcam.png``.

    The image is stain-normalised first when the model was trained so (``spec.normaliser``); the
    plots show the normalised image, what the model sees.

    Returns a JSON-able summary: ``image``, ``model`` (arch), ``predicted``,
    ``probabilities`` (class -> p), ``files`` (paths written) and, with
    Grad-CAM, ``gradcam`` (``class``, ``layer``, ``shape``, ``file``); for a stain-normalised model
    ``stain`` (``method``, ``unchanged``: True when the image had too little tissue to normalise).
    """
    _framework(model)  # refuse an ONNX model before anything is written
    spec = model_spec(model)
    size, mode, classes, arch = spec.image_size, spec.preprocess, list(spec.classes), spec.arch
    out_dir = Path(out_dir)
    image = decode_image(image_path, size)  # (S, S, 3) uint8
    if spec.normaliser is not None:  # as the model was trained: what it sees is shown
        image, unchanged = normalise_batch(spec.normaliser, image[None])
        image = image[0]
    x = preprocess(image[None], mode)  # (1, S, S, 3) float32
    probabilities = model.predict(x, batch_size=1)[0]
    predicted = int(np.argmax(probabilities))
    headline = f"{arch}: predicted {classes[predicted]} (p={probabilities[predicted]:.3f})"
    files = [plot_input(image, x, out_dir / "input.png", f"{Path(image_path).name} | {headline}", mode)]
    maps = feature_maps(model, x, layers)
    for i, (name, value) in enumerate(maps.items(), start=1):
        h, w, k = value.shape
        title = f"{name}: {k} filters, {h}x{w} (each map normalised) | {headline}"
        files.append(plot_feature_grid(value, out_dir / f"{i:02d}_{_safe_name(name)}.png", title))
    summary = {
        "image": str(image_path),
        "model": arch,
        "predicted": classes[predicted],
        "probabilities": {c: float(p) for c, p in zip(classes, probabilities, strict=True)},
        "layers": list(maps),
        "files": [str(f) for f in files],
        "gradcam": None,
    }
    if spec.normaliser is not None:
        summary["stain"] = {"method": spec.normaliser.method, "unchanged": bool(unchanged)}
    if with_gradcam:
        target = resolve_class(model, which_class, probabilities)
        parts = gradcam_parts(model, x, class_index=target)
        heatmap = cam_from_parts(parts["activations"], parts["gradients"])
        block = {output: conv for conv, output in conv_blocks(model)}.get(parts["layer"])
        where = f"the {block} block ({parts['layer']})" if block and block != parts["layer"] else parts["layer"]
        title = f"Grad-CAM for {classes[target]} at {where} | {headline}"
        path = plot_gradcam(image, heatmap, out_dir / "gradcam.png", title)
        summary["files"].append(str(path))
        summary["gradcam"] = {
            "class": classes[target],
            "layer": parts["layer"],
            "shape": list(heatmap.shape),
            "file": str(path),
        }
    return summary


def _single_input(kmodel):
    """The model's input tensor (a one-element list makes Keras warn about the structure)."""
    inputs = kmodel.inputs
    return inputs[0] if len(inputs) == 1 else inputs
