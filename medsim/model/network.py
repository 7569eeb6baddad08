"""The embedding network, defined in one place: a VGG-16 trunk, global pooling, an optional projection, L2 norm.

``EmbeddingNet.state_dict()`` is exactly what a bundle's ``weights.pt`` holds. Its keys are ``features.<i>.*`` with the
indices of ``torchvision.models.vgg16().features`` (so a torchvision or converted state dict loads unchanged) and, when
there is a projection head, ``projection.*``.

The embedding of an image is taken after conv5_3 and its ReLU (``vgg16().features[:30]``; the last max-pool is left
out), pooled over space (GAP or GeM), optionally projected, then L2-normalised.

A network is described by a small JSON-able config (what ``bundle.json`` stores and the fingerprint covers)::

    {"architecture": "vgg16", "layer": {"name": "conv5_3", "features_end": 30},
     "pooling": {"type": "gap"} | {"type": "gem", "p": 3.0},
     "projection": null | {"type": "linear", "in_dim": 512, "out_dim": 128}}

Nothing here changes torch's global settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("vgg16",)

# Layer name -> how many modules of vgg16().features it keeps (the layer's ReLU included).
VGG16_LAYERS = {"conv5_3": 30}
# Channels of the feature map at each layer.
VGG16_LAYER_CHANNELS = {"conv5_3": 512}
DEFAULT_LAYER = "conv5_3"

GEM_EPS = 1e-6


class GlobalAvgPool(nn.Module):
    """(N, C, H, W) -> (N, C): mean over space."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al., TPAMI 2019): (mean over space of x^p)^(1/p).

    p = 1 is average pooling, p -> inf approaches max pooling. ``p`` is a plain constructor parameter (not a
    learned weight, not in the state dict), so the bundle's ``pooling`` entry is its only record.
    """

    def __init__(self, p: float = 3.0, eps: float = GEM_EPS):
        super().__init__()
        if not p > 0:
            raise ValueError(f"GeM p must be > 0, got {p}")
        self.p = float(p)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}"


def pooling_config(pooling: str | Mapping) -> dict:
    """Canonical pooling config from ``"gap"``, ``"gem"`` (p = 3), ``"gem:4"`` or a dict."""
    if isinstance(pooling, str):
        kind, _, arg = pooling.strip().lower().partition(":")
        if kind == "gap" and not arg:
            return {"type": "gap"}
        if kind == "gem":
            return {"type": "gem", "p": float(arg) if arg else 3.0}
        raise ValueError(f"unknown pooling {pooling!r}: use 'gap', 'gem' or 'gem:P'")
    if isinstance(pooling, Mapping):
        kind = str(pooling.get("type", "")).lower()
        if kind == "gap":
            return {"type": "gap"}
        if kind == "gem":
            p = float(pooling.get("p", 3.0))
            if not p > 0:
                raise ValueError(f"GeM p must be > 0, got {p}")
            return {"type": "gem", "p": p}
        raise ValueError(f"unknown pooling type {pooling.get('type')!r}: use 'gap' or 'gem'")
    raise TypeError(f"pooling must be a string or a dict, not {type(pooling).__name__}")


def pooling_tag(pooling: str | Mapping) -> str:
    """Short name for paths and bundle names: 'gap', 'gem' (p = 3) or 'gem-p4'."""
    cfg = pooling_config(pooling)
    if cfg["type"] == "gap":
        return "gap"
    return "gem" if cfg["p"] == 3.0 else f"gem-p{cfg['p']:g}"


def build_pooling(pooling: str | Mapping) -> nn.Module:
    cfg = pooling_config(pooling)
    return GlobalAvgPool() if cfg["type"] == "gap" else GeM(p=cfg["p"])


def layer_config(layer: str | Mapping = DEFAULT_LAYER) -> dict:
    name = layer if isinstance(layer, str) else str(layer.get("name"))
    if name not in VGG16_LAYERS:
        raise ValueError(f"unknown embedding layer {name!r}; known: {sorted(VGG16_LAYERS)}")
    return {"name": name, "features_end": VGG16_LAYERS[name]}


def projection_config(projection: Mapping | None, in_dim: int) -> dict | None:
    if projection is None:
        return None
    kind = str(projection.get("type", "linear"))
    if kind != "linear":
        raise ValueError(f"unknown projection type {kind!r}; known: 'linear'")
    cfg_in = int(projection.get("in_dim", in_dim))
    if cfg_in != in_dim:
        raise ValueError(f"projection in_dim {cfg_in} does not match the pooled feature size {in_dim}")
    out_dim = int(projection["out_dim"])
    if out_dim < 1:
        raise ValueError(f"projection out_dim must be >= 1, got {out_dim}")
    return {"type": "linear", "in_dim": in_dim, "out_dim": out_dim, "bias": bool(projection.get("bias", True))}


def network_config(architecture: str = "vgg16", layer: str | Mapping = DEFAULT_LAYER,
                   pooling: str | Mapping = "gap", projection: Mapping | None = None) -> dict:
    """The canonical config of an embedding network (see module docstring)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {list(ARCHITECTURES)}")
    lcfg = layer_config(layer)
    channels = VGG16_LAYER_CHANNELS[lcfg["name"]]
    return {
        "architecture": architecture,
        "layer": lcfg,
        "pooling": pooling_config(pooling),
        "projection": projection_config(projection, channels),
    }


def embedding_dim(config: Mapping) -> int:
    proj = config.get("projection")
    return int(proj["out_dim"]) if proj else VGG16_LAYER_CHANNELS[config["layer"]["name"]]


def vgg16_features(end: int = VGG16_LAYERS[DEFAULT_LAYER], device: str | torch.device | None = None) -> nn.Sequential:
    """``torchvision.models.vgg16().features[:end]`` (torchvision's definition, same module indices).

    ``device="meta"`` skips the random initialisation; load real weights with ``load_state_dict(..., assign=True)``.
    """
    import torchvision

    with torch.device(device or "cpu"):
        features = torchvision.models.vgg16(weights=None).features
    return features[:end]


class EmbeddingNet(nn.Module):
    """features -> pooling -> optional projection -> L2 normalisation. Output (N, D) float, unit rows."""

    def __init__(self, features: nn.Module, pooling: nn.Module, projection: nn.Module | None = None):
        super().__init__()
        self.features = features
        self.pool = pooling
        self.projection = projection

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, C, h, w) feature map at the embedding layer."""
        return self.features(x)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, C) pooled, unnormalised descriptor (before any projection)."""
        return self.pool(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.forward_pooled(x)
        if self.projection is not None:
            v = self.projection(v)
        return F.normalize(v, p=2.0, dim=1)


def build_network(config: Mapping, device: str | torch.device | None = "meta") -> EmbeddingNet:
    """An ``EmbeddingNet`` for a (canonical) network config; on the meta device by default, to be filled with
    ``load_state_dict(state_dict, assign=True)``."""
    cfg = network_config(config["architecture"], config["layer"], config["pooling"], config.get("projection"))
    features = vgg16_features(cfg["layer"]["features_end"], device=device)
    projection = None
    if cfg["projection"] is not None:
        p = cfg["projection"]
        with torch.device(device or "cpu"):
            projection = nn.Linear(p["in_dim"], p["out_dim"], bias=p["bias"])
    return EmbeddingNet(features, build_pooling(cfg["pooling"]), projection)


def load_network(config: Mapping, state_dict: Mapping[str, torch.Tensor]) -> EmbeddingNet:
    """Build the network for ``config`` and load ``state_dict`` strictly (missing, extra or misshapen keys raise)."""
    net = build_network(config, device="meta")
    net.load_state_dict(dict(state_dict), strict=True, assign=True)
    return net.eval()


def features_to_network_state_dict(features_state_dict: Mapping[str, torch.Tensor],
                                   layer: str | Mapping = DEFAULT_LAYER) -> dict[str, torch.Tensor]:
    """Map a ``vgg16().features`` state dict ("0.weight", ...) or a full ``vgg16()`` one ("features.0.weight", ...,
    "classifier.*") onto ``EmbeddingNet`` keys, keeping only the modules up to the embedding layer."""
    end = layer_config(layer)["features_end"]
    out: dict[str, torch.Tensor] = {}
    for key, value in features_state_dict.items():
        if key.startswith("classifier."):
            continue
        rest = key[len("features."):] if key.startswith("features.") else key
        index, _, param = rest.partition(".")
        if not index.isdigit() or not param:
            raise ValueError(f"not a VGG-16 features key: {key!r}")
        if int(index) < end:
            out[f"features.{index}.{param}"] = value
    return out


def state_dict_content_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors themselves (sorted keys, dtype, shape, little-endian bytes): the same for the same
    weights whatever file format or torch version wrote them."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(key.encode() + b"\0")
        h.update(json.dumps([str(t.dtype), list(t.shape)]).encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
