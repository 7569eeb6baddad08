"""Where two images match: the similarity score decomposed exactly over the spatial positions of each image.

With average pooling (GAP) the embedding is ``e = u / |u|``, ``u = W mean_p f_p + b`` (``W = I, b = 0`` without a
projection), where ``f_p`` is the conv5_3 feature (after its ReLU) at position ``p`` of the h x w map (14 x 14 for a
224 input). The cosine score of a query q and a hit h is therefore a sum over the hit's positions::

    s = e_q . e_h = sum_p [ e_q . (W f_p + b) / (P |u_h|) ]        (P = h * w; the bias is spread evenly)

and symmetrically over the query's positions. ``map_hit[p]`` is the term of position p: the maps sum to the score
exactly (up to float rounding), positive where the hit's region points the same way as the query's embedding.
GeM pooling is not linear in the features, so bundles with GeM are refused (:class:`ExplainError`).

The map covers the model input: the image letterboxed (longest side resized to S, centred, zero-padded) into S x S.
:func:`content_box` says where the image lies in it; :func:`overlay_png` crops the padding away and draws the map at
the image's own aspect ratio, so it lies on the image as displayed. Everything is computed in float32 with the
bundle's network (not the int8/bf16 embedding mode), so the score may differ slightly from the indexed one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from medsim.errors import MedsimError
from medsim.preprocess import PreprocessSpec, prepare


class ExplainError(MedsimError):
    """The model cannot be explained this way (e.g. GeM pooling)."""


@dataclass(frozen=True)
class ContentBox:
    """Where the image lies in the S x S model input: rows top..top+height, columns left..left+width."""

    size: int  # S
    top: int
    left: int
    height: int
    width: int

    def to_dict(self) -> dict:
        return {"input_size": self.size, "top": self.top, "left": self.left, "height": self.height,
                "width": self.width}


def content_box(shape: tuple[int, int], spec: PreprocessSpec) -> ContentBox:
    """The letterbox of :func:`medsim.preprocess.prepare` for an image of ``shape`` (H, W): MONAI's Resize with
    size_mode="longest" (each side * S / longest, rounded) then SpatialPad (symmetric: the odd pixel after)."""
    size = spec.image_size
    scale = size / max(shape)
    height, width = (max(1, int(round(s * scale))) for s in shape)
    return ContentBox(size, (size - height) // 2, (size - width) // 2, height, width)


@dataclass
class Features:
    """One image through the network, kept for explanations: its conv feature map and letterbox."""

    fmap: np.ndarray  # (C, h, w) float32, after the layer's ReLU
    box: ContentBox
    image_shape: tuple[int, int]


@dataclass
class Explanation:
    score: float  # float32 cosine of the two embeddings
    query_map: np.ndarray  # (h, w): contributions of the query's positions; sums to score
    hit_map: np.ndarray  # (h, w): contributions of the hit's positions; sums to score


class Explainer:
    """Feature maps and explanations with one bundle's network in float32."""

    def __init__(self, network, spec: PreprocessSpec, pooling: dict):
        if (pooling or {}).get("type") != "gap":
            raise ExplainError(f"explanations need average pooling (GAP); this model pools with "
                               f"{(pooling or {}).get('type', '?')}, which does not decompose over positions")
        self.network = network.float().eval()
        self.spec = spec
        projection = getattr(network, "projection", None)
        if projection is not None:
            self.weight = projection.weight.detach().float().cpu().numpy().astype(np.float64)
            bias = projection.bias
            self.bias = (bias.detach().float().cpu().numpy().astype(np.float64) if bias is not None
                         else np.zeros(self.weight.shape[0]))
        else:
            self.weight, self.bias = None, None

    @classmethod
    def for_bundle(cls, bundle) -> "Explainer":
        if bundle.pooling.get("type") != "gap":
            raise ExplainError(f"model {bundle.name} pools with {bundle.pooling.get('type')}: explanations need "
                               "average pooling (GAP), whose score decomposes exactly over positions")
        return cls(bundle.network(), bundle.preprocess, bundle.pooling)

    def features(self, pixels: np.ndarray) -> Features:
        """The feature map of a display-ready image (H, W) in [0, 1]."""
        return self.features_of_input(prepare(pixels, self.spec).array, np.shape(pixels))

    def features_of_input(self, array: np.ndarray, image_shape: tuple[int, int]) -> Features:
        """The feature map of an already prepared (3, S, S) model input."""
        import torch

        with torch.inference_mode():
            fmap = self.network.forward_features(torch.from_numpy(np.ascontiguousarray(array, np.float32))[None])
        return Features(fmap[0].float().numpy(), content_box(tuple(image_shape[:2]), self.spec), tuple(image_shape[:2]))

    def _terms(self, fmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(per-position projected terms (P, D) whose mean is u, the embedding e = u / |u|), in float64."""
        c = fmap.shape[0]
        positions = fmap.reshape(c, -1).T.astype(np.float64)  # (P, C)
        if self.weight is not None:
            positions = positions @ self.weight.T + self.bias  # W f_p + b: their mean is u
        u = positions.mean(axis=0)
        return positions, u / max(np.linalg.norm(u), 1e-30)

    def embedding(self, features: Features) -> np.ndarray:
        return self._terms(features.fmap)[1].astype(np.float32)

    def explain(self, query: Features, hit: Features) -> Explanation:
        tq, eq = self._terms(query.fmap)
        th, eh = self._terms(hit.fmap)
        nq = np.linalg.norm(tq.mean(axis=0))
        nh = np.linalg.norm(th.mean(axis=0))
        count = tq.shape[0]
        hit_map = (th @ eq) / (count * max(nh, 1e-30))
        query_map = (tq @ eh) / (count * max(nq, 1e-30))
        shape = query.fmap.shape[1:]
        return Explanation(score=float(eq @ eh), query_map=query_map.reshape(shape),
                           hit_map=hit_map.reshape(hit.fmap.shape[1:]))


def map_on_image(values: np.ndarray, box: ContentBox, out_shape: tuple[int, int]) -> np.ndarray:
    """A map over the model input's grid, as an (H, W) float array over the image itself: upsampled (bilinear) to the
    S x S input, the letterbox padding cropped away, resized to ``out_shape``."""
    from PIL import Image

    grid = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    full = grid.resize((box.size, box.size), Image.Resampling.BILINEAR)
    cropped = full.crop((box.left, box.top, box.left + box.width, box.top + box.height))
    return np.asarray(cropped.resize((out_shape[1], out_shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def overlay_size(image_shape: tuple[int, int], longest: int) -> tuple[int, int]:
    """(H, W) of an overlay whose longest side is ``longest``, at the image's aspect ratio."""
    h, w = image_shape[:2]
    scale = longest / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def overlay_png(values: np.ndarray, box: ContentBox, image_shape: tuple[int, int], longest: int = 256,
                scale: float | None = None) -> bytes:
    """A transparent RGBA PNG of the map at the image's aspect ratio (longest side ``longest``): warm colours where
    a region adds to the score, opacity by its share of the largest contribution (``scale``; default the map's own
    largest); regions that lower the score stay clear."""
    from PIL import Image

    shape = overlay_size(image_shape, longest)
    on_image = map_on_image(values, box, shape)
    top = scale if scale and scale > 0 else float(max(np.max(values), 1e-12))
    level = np.clip(on_image / top, 0.0, 1.0)
    rgba = np.zeros((*shape, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 1] = np.round(220 * (1.0 - level) + 35 * level).astype(np.uint8)  # yellow (weak) -> red (strong)
    rgba[..., 2] = 0
    rgba[..., 3] = np.round(170 * level ** 0.8).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(out, format="PNG", optimize=True)
    return out.getvalue()
