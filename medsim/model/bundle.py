"""Model bundles: the weights of an embedding network together with everything needed to use them correctly.

A bundle is a directory::

    bundle.json   what the network is, how its input must be preprocessed, where the weights come from
    weights.pt    torch state dict of ``medsim.model.network.EmbeddingNet`` (float32)

bundle.json (format_version 1)::

    format_version      1
    name                e.g. "vgg16-imagenet-gap"
    fingerprint         16 hex digits: sha256 over the weights' content hash and the canonical JSON of architecture,
                        layer, pooling, projection, preprocess and embedding_dim. Vectors and indexes carry it; two
                        bundles with the same fingerprint embed identically.
    architecture        "vgg16"
    layer               {"name": "conv5_3", "features_end": 30}: vgg16().features[:30], conv5_3 after its ReLU
    embedding_dim       512 (or the projection's out_dim)
    pooling             {"type": "gap"} or {"type": "gem", "p": 3.0}; then L2 normalisation
    projection          null, or {"type": "linear", "in_dim": 512, "out_dim": D, "bias": true}
    preprocess          PreprocessSpec.to_dict(); preprocess_fingerprint is its short hash
    weights_file        "weights.pt"
    weights_sha256      sha256 of weights.pt as written (integrity check on load)
    weights_content_sha256  sha256 of the tensors (keys, dtypes, shapes, bytes): independent of torch's file format
    provenance          {"source", "licence", "citation", ...}
    label_vocabulary    [] (fine-tuned bundles: the labels of their classifier)
    created_at          UTC ISO 8601
    software            versions of medsim, torch, torchvision that wrote it
    extra               free-form metadata (conversion check, training details)

A bundle carries what is needed to use its weights correctly, as torchvision's weights carry their transforms and
meta: ``preprocess`` (the ``PreprocessSpec`` its input must be prepared with), ``metadata``/``provenance``, and, for
trained bundles, its int8 calibration (``medsim.model.quantize``). ``ModelBundle.embedder()`` makes the
``medsim.model.embedder.Embedder`` that turns pixels into vectors with them.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from medsim.errors import MedsimError
from medsim.model.embedder import Embedder
from medsim.model.network import (
    EmbeddingNet,
    embedding_dim as _embedding_dim,
    load_network,
    network_config,
    state_dict_content_sha256,
)
from medsim.model.quantize import Int8Calibration
from medsim.preprocess import PreprocessSpec

FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
WEIGHTS_FILE = "weights.pt"
FINGERPRINT_LENGTH = 16
REQUIRED_PROVENANCE = ("source", "licence", "citation")
_REQUIRED_KEYS = ("format_version", "name", "fingerprint", "architecture", "layer", "embedding_dim", "pooling",
                  "preprocess", "weights_sha256", "weights_content_sha256", "provenance")


class BundleError(MedsimError):
    """A model bundle is missing, unreadable, or cannot be written."""


class BundleIntegrityError(BundleError):
    """A bundle's files do not match its bundle.json (tampered, truncated, or edited by hand)."""


class BundleExistsError(BundleError, FileExistsError):
    """``ModelBundle.create`` found a bundle already at the target path."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def compute_fingerprint(weights_content_sha256: str, config: Mapping[str, Any]) -> str:
    """Short hash identifying what a bundle computes: the weights' content and the canonical JSON of ``config``
    (architecture, layer, pooling, projection, preprocess, embedding_dim)."""
    keys = ("architecture", "layer", "pooling", "projection", "preprocess", "embedding_dim")
    payload = weights_content_sha256 + "\n" + canonical_json({k: config.get(k) for k in keys})
    return hashlib.sha256(payload.encode()).hexdigest()[:FINGERPRINT_LENGTH]


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _software() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("medsim", "torch", "torchvision"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class ModelBundle:
    """A loaded, verified bundle. Use ``ModelBundle.load`` or ``ModelBundle.create``, not the constructor."""

    def __init__(self, path: Path, meta: dict):
        self._path = Path(path)
        self._meta = meta
        self._preprocess = PreprocessSpec.from_dict(meta["preprocess"])

    # ---------------------------------------------------------------- attributes
    @property
    def path(self) -> Path:
        return self._path

    @property
    def name(self) -> str:
        return self._meta["name"]

    @property
    def fingerprint(self) -> str:
        return self._meta["fingerprint"]

    @property
    def preprocess(self) -> PreprocessSpec:
        return self._preprocess

    @property
    def pooling(self) -> dict:
        return dict(self._meta["pooling"])

    @property
    def embedding_dim(self) -> int:
        return int(self._meta["embedding_dim"])

    @property
    def architecture(self) -> str:
        return self._meta["architecture"]

    @property
    def label_vocabulary(self) -> tuple[str, ...]:
        return tuple(self._meta.get("label_vocabulary", ()))

    @property
    def provenance(self) -> dict:
        return copy.deepcopy(self._meta["provenance"])

    @property
    def extra(self) -> dict:
        return copy.deepcopy(self._meta.get("extra", {}))

    @property
    def metadata(self) -> dict:
        """The whole of bundle.json (a copy)."""
        return copy.deepcopy(self._meta)

    @property
    def network_config(self) -> dict:
        m = self._meta
        return network_config(m["architecture"], m["layer"], m["pooling"], m.get("projection"))

    def __repr__(self) -> str:
        return f"ModelBundle(name={self.name!r}, fingerprint={self.fingerprint!r}, path='{self.path}')"

    # ---------------------------------------------------------------- load / create
    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelBundle":
        """Open the bundle directory ``path`` (or its bundle.json) and verify it: weights.pt present with the
        recorded sha256, fingerprint consistent with bundle.json."""
        path = Path(path).expanduser()
        if path.name == BUNDLE_JSON and path.is_file():
            path = path.parent
        meta_path = path / BUNDLE_JSON
        if not meta_path.is_file():
            raise BundleError(f"no model bundle at {path} (no {BUNDLE_JSON})")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{meta_path} is not readable JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise BundleError(f"{meta_path} is not a bundle description")
        missing = [k for k in _REQUIRED_KEYS if k not in meta]
        if missing:
            raise BundleError(f"{meta_path} lacks {', '.join(missing)}")
        if int(meta["format_version"]) > FORMAT_VERSION:
            raise BundleError(f"bundle {path} has format_version {meta['format_version']}; this medsim reads up to "
                              f"{FORMAT_VERSION}: upgrade medsim")
        try:
            config = network_config(meta["architecture"], meta["layer"], meta["pooling"], meta.get("projection"))
            spec = PreprocessSpec.from_dict(meta["preprocess"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{meta_path}: invalid network or preprocess description: {exc}") from None
        if int(meta["embedding_dim"]) != _embedding_dim(config):
            raise BundleIntegrityError(f"{meta_path}: embedding_dim {meta['embedding_dim']} does not match the network "
                                       f"({_embedding_dim(config)})")
        expected = compute_fingerprint(meta["weights_content_sha256"],
                                       {**config, "preprocess": spec.to_dict(), "embedding_dim": meta["embedding_dim"]})
        if expected != meta["fingerprint"]:
            raise BundleIntegrityError(f"bundle {path}: fingerprint {meta['fingerprint']} does not match its contents "
                                       f"({expected}); bundle.json was edited: rebuild the bundle")
        bundle = cls(path, meta)
        bundle._read_weights()  # integrity of weights.pt
        return bundle

    def _read_weights(self) -> bytes:
        weights = self.path / WEIGHTS_FILE
        try:
            data = weights.read_bytes()
        except FileNotFoundError:
            raise BundleIntegrityError(f"bundle {self.path}: {weights.name} is missing; rebuild the bundle") from None
        except OSError as exc:
            raise BundleError(f"bundle {self.path}: cannot read {weights.name}: {exc}") from None
        if _sha256_bytes(data) != self._meta["weights_sha256"]:
            raise BundleIntegrityError(
                f"bundle {self.path}: {weights.name} does not match the sha256 recorded in {BUNDLE_JSON} "
                f"(tampered with or corrupt); rebuild the bundle"
            )
        return data

    @classmethod
    def create(cls, path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], *, name: str,
               preprocess: PreprocessSpec, pooling: str | Mapping, provenance: Mapping[str, Any],
               label_vocabulary: Iterable[str] = (), extra: Mapping[str, Any] | None = None,
               architecture: str = "vgg16", layer: str = "conv5_3", projection: Mapping | None = None,
               overwrite: bool = False) -> "ModelBundle":
        """Write a bundle atomically (a temporary directory beside ``path``, renamed into place) and load it.

        state_dict: of the ``EmbeddingNet`` described by architecture/layer/pooling/projection (keys
            "features.<i>.*", "projection.*"); checked strictly. See
            ``medsim.model.network.features_to_network_state_dict`` for plain VGG-16 state dicts.
        provenance: at least "source", "licence" and "citation".
        overwrite: replace an existing bundle at ``path``; otherwise ``BundleExistsError``.
        """
        path = Path(path).expanduser()
        if not name or not isinstance(name, str):
            raise ValueError("a bundle needs a name")
        if not isinstance(preprocess, PreprocessSpec):
            raise TypeError("preprocess must be a medsim.preprocess.PreprocessSpec")
        provenance = dict(provenance)
        absent = [k for k in REQUIRED_PROVENANCE if not provenance.get(k)]
        if absent:
            raise ValueError(f"provenance lacks {', '.join(absent)}")
        vocabulary = [str(label) for label in label_vocabulary]
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("label_vocabulary has duplicates")
        extra = dict(extra or {})
        config = network_config(architecture, layer, pooling, projection)

        state = {}
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state_dict[{key!r}] is not a tensor")
            value = value.detach().to("cpu")
            state[key] = (value.to(torch.float32) if value.is_floating_point() else value).contiguous().clone()
        try:
            load_network(config, state)
        except RuntimeError as exc:
            raise ValueError(f"state_dict does not fit the network {canonical_json(config)}: {exc}") from None

        buffer = io.BytesIO()
        torch.save(state, buffer)
        weights_bytes = buffer.getvalue()
        content_sha = state_dict_content_sha256(state)
        dim = _embedding_dim(config)
        meta = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "fingerprint": compute_fingerprint(content_sha,
                                               {**config, "preprocess": preprocess.to_dict(), "embedding_dim": dim}),
            "architecture": config["architecture"],
            "layer": config["layer"],
            "embedding_dim": dim,
            "pooling": config["pooling"],
            "projection": config["projection"],
            "preprocess": preprocess.to_dict(),
            "preprocess_fingerprint": preprocess.fingerprint,
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": _sha256_bytes(weights_bytes),
            "weights_content_sha256": content_sha,
            "provenance": provenance,
            "label_vocabulary": vocabulary,
            "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "software": _software(),
            "extra": extra,
        }
        try:
            meta_bytes = (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bundle metadata is not JSON-serialisable: {exc}") from None

        if path.exists() and not overwrite:
            raise BundleExistsError(f"a bundle already exists at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        old = None
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            _fsync_write(tmp / WEIGHTS_FILE, weights_bytes)
            _fsync_write(tmp / BUNDLE_JSON, meta_bytes)
            if path.exists() and overwrite:
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, old / "bundle")
            try:
                os.rename(tmp, path)
            except OSError as exc:
                if path.exists():  # someone else finished first
                    raise BundleExistsError(f"a bundle already exists at {path}") from exc
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return cls.load(path)

    # ---------------------------------------------------------------- use
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The verified weights (file sha256 and content hash both checked)."""
        data = self._read_weights()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if state_dict_content_sha256(state) != self._meta["weights_content_sha256"]:
            raise BundleIntegrityError(f"bundle {self.path}: the weights' content does not match "
                                       f"weights_content_sha256; rebuild the bundle")
        return state

    def network(self, device: str | torch.device = "cpu") -> EmbeddingNet:
        """The embedding network with the bundle's weights, in eval mode."""
        return load_network(self.network_config, self.state_dict()).to(device).eval()

    def int8_calibration(self) -> Int8Calibration | None:
        """The bundle's int8 calibration images and check (``medsim.model.quantize``), or None."""
        return Int8Calibration.load(self.path, self.extra.get("int8", {}))

    def embedder(self, device: str | torch.device = "cpu", batch_size: int = 16, mode: str | None = None
                 ) -> Embedder:
        """An ``Embedder`` with this bundle's network, preprocessing, fingerprint and int8 calibration; mode: one of
        ``medsim.model.embedder.EMBED_MODES``, or None / "auto" for ``default_embed_mode``."""
        return Embedder(self.network(), self.preprocess, device=device, batch_size=batch_size,
                        fingerprint=self.fingerprint, name=self.name, mode=mode,
                        int8=self.int8_calibration())
