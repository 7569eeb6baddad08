"""What is trained: the trainable tail of VGG-16, pooling, a projection head, and the losses that serve retrieval.

The network that is trained maps cached trunk activations (pool4, or a later frozen block-5 layer) to

    embedding = L2(projection(pool(block5_tail(x))))        -- exactly what the bundle's EmbeddingNet computes
    logits    = scale * cos(embedding, class_weights) + bias  -- a cosine classifier over the label vocabulary

Objectives (``--objective``, summed with their weights):

* ``bce``: multi-label binary cross-entropy of the cosine classifier on the *embedding* itself, so that the
  embedding space is organised by findings (cases of one finding point the same way).
* ``supcon``: supervised contrastive loss (Khosla et al. 2020) generalised to multi-label: for each anchor, every
  other case of the batch that shares at least one label with it is a positive -- the relevance used for retrieval.
  Pairs of the same patient are left out entirely (neither positive nor negative), as retrieval excludes them.
* ``ms``: multi-similarity loss (Wang et al., CVPR 2019) with the same relevance and the same patient rule.
* ``adv``: a source classifier on the embedding behind a gradient-reversal layer (Ganin & Lempitsky 2015): the
  embedding is pushed to *not* tell the source archives apart (``--adversary`` scales the reversed gradient).

Per-finding weighting (``--rarity R``): label f weighs ``freq_f ** -R`` (normalised to mean 1 over the vocabulary),
in bce (per label column) and in supcon, where a pair's positive weight becomes the summed weight of the labels it
shares -- two cases sharing a rare finding pull together harder than two normals. ``--cross-source C`` multiplies
the positive weight of pairs from different source families (positives drawn across sources).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsim.model.network import build_pooling
from medsim.train.config import OBJECTIVES
from medsim.train.feedback import feedback_loss


def parse_objective(text: str) -> dict[str, float]:
    """"bce+supcon" -> {"bce": 1.0, "supcon": 1.0}; "bce+0.5*supcon" -> {"bce": 1.0, "supcon": 0.5}."""
    out: dict[str, float] = {}
    for part in text.replace(" ", "").split("+"):
        if not part:
            continue
        weight, _, name = part.rpartition("*")
        name = name.lower()
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)} (combine with '+')")
        out[name] = float(weight) if weight else 1.0
    if not out:
        raise ValueError("empty objective")
    return out


class RetrievalNet(nn.Module):
    """Trainable tail + pooling + projection (+ cosine classifier). ``tail`` is ``vgg16().features[start:30]``
    (an empty Sequential when only the head trains)."""

    def __init__(self, tail: nn.Sequential, pooling: Mapping, projection: nn.Linear, n_labels: int,
                 scale: float = 16.0):
        super().__init__()
        self.tail = tail
        self.pool = build_pooling(pooling)
        self.projection = projection
        self.class_weight = nn.Parameter(torch.randn(n_labels, projection.out_features) * 0.01)
        self.class_bias = nn.Parameter(torch.zeros(n_labels))
        self.scale = float(scale)
        self.source_head: nn.Linear | None = None  # the "adv" objective's source classifier (not exported)
        self.adversary = 1.0

    def add_source_head(self, n_sources: int, strength: float = 1.0) -> None:
        self.source_head = nn.Linear(self.projection.out_features, max(2, n_sources))
        self.adversary = float(strength)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.pool(self.tail(x))), dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.embed(x)
        logits = self.scale * emb @ F.normalize(self.class_weight, dim=1).T + self.class_bias
        out = {"embedding": emb, "logits": logits}
        if self.source_head is not None:
            out["source_logits"] = self.source_head(GradReverse.apply(emb, self.adversary))
        return out

    def classifier_json(self, vocabulary: Sequence[str]) -> dict:
        """The cosine classifier as a bundle stores it (``extra.classifier``)."""
        return {"type": "cosine", "scale": self.scale, "vocabulary": list(vocabulary),
                "weight": encode_tensor(F.normalize(self.class_weight, dim=1)), "bias": encode_tensor(self.class_bias)}

    def load_classifier(self, classifier: Mapping | None, vocabulary: Sequence[str]) -> None:
        """Start from a bundle's classifier (:meth:`classifier_json`) when it is over the same vocabulary."""
        if not classifier or classifier.get("vocabulary") != list(vocabulary):
            return
        weight = decode_tensor(classifier["weight"])
        if weight.shape == self.class_weight.shape:
            with torch.no_grad():
                self.class_weight.copy_(weight)
                self.class_bias.copy_(decode_tensor(classifier["bias"]))


class GradReverse(torch.autograd.Function):
    """Identity forward; the gradient times -strength backward."""

    @staticmethod
    def forward(ctx, x, strength: float):
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.strength * grad, None


def label_weights(frequency: Sequence[float], rarity: float) -> torch.Tensor:
    """Per-label weights ``freq ** -rarity`` normalised to mean 1 (labels never seen get the largest weight)."""
    f = torch.as_tensor(list(frequency), dtype=torch.float32)
    seen = f > 0
    f = torch.where(seen, f, f[seen].min() if bool(seen.any()) else torch.ones(()))
    w = f.clamp_min(1e-6) ** (-float(rarity))
    return w / w.mean()


def encode_tensor(t: torch.Tensor) -> dict:
    """A tensor as JSON: float32 bytes in base64, with the shape."""
    a = t.detach().to("cpu", torch.float32).contiguous().numpy()
    return {"dtype": "float32", "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode()}


def decode_tensor(d: Mapping) -> torch.Tensor:
    """The tensor :func:`encode_tensor` stored."""
    a = np.frombuffer(base64.b64decode(d["base64"]), dtype=np.float32).reshape(d["shape"])
    return torch.from_numpy(a.copy())


def _pair_masks(labels: torch.Tensor, patients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, positive) (B, B) bool: valid = different patients; positive = valid and sharing a label."""
    valid = patients[:, None] != patients[None, :]
    shares = (labels @ labels.T) > 0
    return valid, shares & valid


def supcon_loss(emb: torch.Tensor, labels: torch.Tensor, patients: torch.Tensor, temperature: float = 0.1,
                label_weight: torch.Tensor | None = None, sources: torch.Tensor | None = None,
                cross_source: float = 1.0) -> torch.Tensor:
    """Multi-label supervised contrastive loss. Without ``label_weight`` every positive (shares a label) counts
    alike; with it a positive pair weighs the summed weight of its shared labels, times ``cross_source`` when the
    two come from different ``sources``."""
    valid, positive = _pair_masks(labels, patients)
    logits = emb @ emb.T / temperature
    logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min / 2)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    if label_weight is None and (sources is None or cross_source == 1.0):
        weight = positive.float()
    else:
        lw = label_weight if label_weight is not None else labels.new_ones(labels.shape[1])
        weight = ((labels * lw) @ labels.T) * positive
        if sources is not None and cross_source != 1.0:
            weight = weight * torch.where(sources[:, None] != sources[None, :], float(cross_source), 1.0)
    n_pos = weight.sum(dim=1)
    has = n_pos > 0
    if not bool(has.any()):
        return emb.sum() * 0.0
    per_anchor = -(log_prob * weight).sum(dim=1)[has] / n_pos[has]
    return per_anchor.mean()


def multi_similarity_loss(emb: torch.Tensor, labels: torch.Tensor, patients: torch.Tensor, alpha: float = 2.0,
                          beta: float = 40.0, base: float = 0.5, margin: float = 0.1) -> torch.Tensor:
    valid, positive = _pair_masks(labels, patients)
    negative = valid & ~positive
    sim = emb @ emb.T
    losses = []
    for i in range(len(emb)):
        pos, neg = sim[i][positive[i]], sim[i][negative[i]]
        if len(pos) == 0 or len(neg) == 0:
            continue
        # mining: negatives harder than the easiest positive, positives harder than the hardest negative
        neg = neg[neg + margin > pos.min()]
        pos = pos[pos - margin < neg.max()] if len(neg) else pos[:0]
        if len(pos) == 0 or len(neg) == 0:
            continue
        losses.append(torch.log1p(torch.exp(-alpha * (pos - base)).sum()) / alpha
                      + torch.log1p(torch.exp(beta * (neg - base)).sum()) / beta)
    return torch.stack(losses).mean() if losses else emb.sum() * 0.0


class RetrievalLoss(nn.Module):
    """Weighted sum of the objectives; called by the MONAI trainer as ``loss(pred, targets)``."""

    def __init__(self, weights: Mapping[str, float], temperature: float = 0.1, pos_weight: torch.Tensor | None = None,
                 label_weight: torch.Tensor | None = None, cross_source: float = 1.0):
        super().__init__()
        self.weights = dict(weights)
        self.temperature = float(temperature)
        self.cross_source = float(cross_source)
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else torch.empty(0))
        self.register_buffer("label_weight", label_weight if label_weight is not None else torch.empty(0))
        self.last: dict[str, float] = {}

    def forward(self, pred: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # the losses run in float32, also under mixed precision (autocast would compute emb @ emb.T in float16)
        with torch.autocast(device_type=pred["embedding"].device.type, enabled=False):
            p = {"embedding": pred["embedding"].float(), "logits": pred["logits"].float()}
            if "source_logits" in pred:
                p["source_logits"] = pred["source_logits"].float()
            return self._forward(p, targets["labels"].float(), targets["patient"], targets.get("source"),
                                 targets.get("pairs"))

    def _forward(self, pred: Mapping[str, torch.Tensor], labels: torch.Tensor, patients: torch.Tensor,
                 sources: torch.Tensor | None = None, pairs: torch.Tensor | None = None) -> torch.Tensor:
        total = pred["embedding"].new_zeros(())
        parts = {}
        lw = self.label_weight if self.label_weight.numel() else None
        if "bce" in self.weights:
            pw = self.pos_weight if self.pos_weight.numel() else None
            parts["bce"] = F.binary_cross_entropy_with_logits(pred["logits"], labels, pos_weight=pw, weight=lw)
        if "supcon" in self.weights:
            parts["supcon"] = supcon_loss(pred["embedding"], labels, patients, self.temperature, label_weight=lw,
                                          sources=sources, cross_source=self.cross_source)
        if "adv" in self.weights and "source_logits" in pred and sources is not None:
            parts["adv"] = F.cross_entropy(pred["source_logits"], sources)
        if "ms" in self.weights:
            parts["ms"] = multi_similarity_loss(pred["embedding"], labels, patients)
        if "feedback" in self.weights and pairs is not None:  # --feedback: voted pairs (medsim.train.feedback)
            parts["feedback"] = feedback_loss(pred["embedding"], pairs)
        for name, value in parts.items():
            total = total + self.weights[name] * value
        self.last = {k: float(v.detach()) for k, v in parts.items()}
        return total


def init_projection(out_dim: int, pooled: torch.Tensor | None = None, in_dim: int = 512) -> nn.Linear:
    """The projection at the start of training: the identity when ``out_dim == in_dim`` (training starts from the
    ImageNet embedding), else the top principal directions of ``pooled`` training descriptors (centred), so the
    projected ImageNet embedding keeps as much of its geometry as a linear map of that size can."""
    proj = nn.Linear(in_dim, out_dim)
    with torch.no_grad():
        if out_dim == in_dim:
            proj.weight.copy_(torch.eye(in_dim))
            proj.bias.zero_()
        elif pooled is not None and len(pooled) > out_dim:
            x = pooled.double()
            mean = x.mean(0)
            _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
            w = v[:out_dim].float()
            proj.weight.copy_(w)
            proj.bias.copy_(-(w @ mean.float()))
        else:
            nn.init.orthogonal_(proj.weight)
            proj.bias.zero_()
    return proj


def cosine_schedule_lambda(max_epochs: int, warmup_epochs: int = 0):
    def f(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        t = (epoch - warmup_epochs) / max(1, max_epochs - warmup_epochs)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f
