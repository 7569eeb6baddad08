"""The retrieval methods compared by `medsim evaluate`, each turning an EvalSet into an (N, N) similarity matrix.

CNN methods embed through :func:`medsim.build.build_index` (the same code path as `medsim build-index`) into an
index cached under the cache folder, keyed by the model fingerprint and the data; classical methods cache their
feature vectors, keyed by their parameters and the data. Nothing derived from the images is written into the
repository: the default cache is ``$MEDSIM_HOME/eval-cache``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsim.errors import MedsimError
from medsim.files import medsim_home

log = logging.getLogger("medsim.evaluate")

KEYPOINT_METHODS = ("sift", "orb", "kaze", "akaze", "surf")
HASH_METHODS = ("phash", "dhash")
DEFAULT_METHODS = ("cnn", "sift", "surf", "orb", "phash", "dhash")


@dataclass
class MethodSpec:
    key: str  # unique row key, e.g. "cnn", "cnn-finetuned", "sift"
    title: str  # what the report calls it
    family: str  # cnn | bovw | hash
    params: dict = field(default_factory=dict)
    note: str = ""


@dataclass
class MethodOutput:
    spec: MethodSpec
    scores: np.ndarray | None = None
    unavailable: str | None = None
    info: dict = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False


@dataclass
class MethodOptions:
    cache_dir: Path
    jobs: int = 1
    vocabulary_size: int = 1000
    n_features: int = 500
    image_size: int = 512
    clahe: bool = True
    max_training_descriptors: int = 100_000
    hash_size: int = 8
    batch_size: int = 16
    progress: bool = True


def default_cache_dir() -> Path:
    return medsim_home() / "eval-cache"


def expand_methods(names: Sequence[str], model: str | None = None) -> tuple[list[MethodSpec], list[str]]:
    """Method specs for the names a user gave, and notes about what was added or changed.

    "cnn": the ImageNet VGG-16 bundle, plus the fine-tuned bundle (``resolve_bundle("default")``) when one exists.
    "cnn-finetuned": only the fine-tuned bundle. "cnn:SPEC": any bundle resolve_bundle understands.
    "surf": SURF when the installed OpenCV has it; otherwise a row that says it is unavailable, and a KAZE row.
    """
    specs: list[MethodSpec] = []
    notes: list[str] = []
    seen = set()

    def add(spec: MethodSpec) -> None:
        if spec.key not in seen:
            seen.add(spec.key)
            specs.append(spec)

    for raw in names:
        name = raw.strip()
        low = name.lower()
        if not name:
            continue
        if low == "cnn":
            add(MethodSpec("cnn", "CNN (VGG-16, ImageNet)", "cnn", {"bundle": model or "imagenet"}))
            finetuned = _finetuned_bundle_path()
            if model is None and finetuned is not None:
                add(MethodSpec("cnn-finetuned", "CNN (VGG-16, fine-tuned)", "cnn", {"bundle": "default"}))
            elif model is None:
                notes.append("no fine-tuned model bundle found (`make model` builds one): only the ImageNet CNN is "
                             "evaluated")
        elif low == "cnn-finetuned":
            add(MethodSpec("cnn-finetuned", "CNN (VGG-16, fine-tuned)", "cnn", {"bundle": "default"}))
        elif low.startswith("cnn:"):
            spec = name.split(":", 1)[1]
            add(MethodSpec(f"cnn:{Path(spec).name or spec}", f"CNN ({Path(spec).name or spec})", "cnn",
                           {"bundle": spec}))
        elif low in KEYPOINT_METHODS:
            from medsim.baselines import DETECTOR_TITLES, detector_status

            title = f"{DETECTOR_TITLES[low]} (bag of visual words)"
            available, reason = detector_status(low)
            if low == "surf" and not available:
                add(MethodSpec("surf", title, "bovw", {"detector": "surf"}, note=reason))
                notes.append("SURF is not available: " + reason + ". The OpenCV wheels on PyPI are built without "
                             "the non-free module, and no other SURF implementation is installable from a package "
                             "registry here. KAZE, the nearest available detector (Hessian-determinant keypoints, "
                             "64-d M-SURF-style descriptor), is evaluated as its own row, named KAZE.")
                add(MethodSpec("kaze", "KAZE (bag of visual words; stands in for SURF)", "bovw",
                               {"detector": "kaze"}))
                continue
            add(MethodSpec(low, title, "bovw", {"detector": low}, note="" if available else reason))
        elif low in HASH_METHODS:
            add(MethodSpec(low, {"phash": "pHash", "dhash": "dHash"}[low] + " (Hamming)", "hash", {"kind": low}))
        elif low == "hash":
            for kind in HASH_METHODS:
                add(MethodSpec(kind, {"phash": "pHash", "dhash": "dHash"}[kind] + " (Hamming)", "hash",
                               {"kind": kind}))
        else:
            raise MedsimError(f"unknown method {name!r}: one of cnn, cnn-finetuned, cnn:BUNDLE, "
                              f"{', '.join(KEYPOINT_METHODS)}, {', '.join(HASH_METHODS)}")
    return specs, notes


def _finetuned_bundle_path() -> Path | None:
    try:
        from medsim.model import default_bundle_path
    except ImportError:
        return None
    path = default_bundle_path()
    return path if (path / "bundle.json").is_file() else None


def resolve_cnn_bundle(spec: MethodSpec):
    from medsim.model import resolve_bundle

    return resolve_bundle(spec.params["bundle"])


class LazyImages(Sequence):
    """The display-ready pixels of an EvalSet, read on access (so a full dev set is never all in memory)."""

    def __init__(self, eval_set):
        self.eval_set = eval_set

    def __len__(self) -> int:
        return len(self.eval_set)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.eval_set.pixels(i)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def compute(spec: MethodSpec, eval_set, options: MethodOptions, bundle=None) -> MethodOutput:
    """The (N, N) similarity matrix of one method over the evaluation set (or why it is unavailable)."""
    started = time.perf_counter()
    out = MethodOutput(spec)
    try:
        if spec.family == "cnn":
            vectors, out.info, out.cached = _cnn_vectors(spec, eval_set, options, bundle)
            out.scores = (vectors @ vectors.T).astype(np.float32)
        elif spec.family == "bovw":
            vectors, out.info, out.cached = _bovw_vectors(spec, eval_set, options)
            out.scores = (vectors @ vectors.T).astype(np.float32)
        elif spec.family == "hash":
            from medsim.baselines import PerceptualHash

            bits, out.info, out.cached = _hash_bits(spec, eval_set, options)
            out.scores = PerceptualHash.similarity(bits)
        else:
            raise MedsimError(f"unknown method family {spec.family}")
    except MedsimError as exc:
        from medsim.baselines import DetectorUnavailable

        if not isinstance(exc, DetectorUnavailable) and spec.family != "cnn":
            raise
        out.unavailable = str(exc)
        log.warning("medsim evaluate: %s unavailable: %s", spec.title, exc)
    out.seconds = time.perf_counter() - started
    return out


def _bovw_vectors(spec, eval_set, options):
    from medsim.baselines import BagOfVisualWords

    params = dict(detector=spec.params["detector"], vocabulary_size=options.vocabulary_size,
                  n_features=options.n_features, image_size=options.image_size, clahe=options.clahe,
                  max_training_descriptors=options.max_training_descriptors, random_state=0)
    cache = options.cache_dir / f"bovw-{params['detector']}-{_key(params, eval_set.fingerprint())}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        return data["vectors"], json.loads(str(data["info"])), True
    model = BagOfVisualWords(**params, n_jobs=options.jobs, progress=options.progress)
    vectors = model.fit_transform(LazyImages(eval_set))
    info = {"params": params, "vocabulary_words": int(len(model.vocabulary_)),
            "training_descriptors": model.n_training_descriptors_,
            "descriptors_per_image": round(model.descriptors_per_image_, 1),
            "images_without_keypoints": model.images_without_keypoints_,
            "vocabulary_learned_on": "the evaluation images (gallery), without labels"}
    _save_npz(cache, vectors=vectors, info=np.asarray(json.dumps(info)))
    return vectors, info, False


def _hash_bits(spec, eval_set, options):
    from medsim.baselines import PerceptualHash

    params = dict(kind=spec.params["kind"], hash_size=options.hash_size)
    cache = options.cache_dir / f"hash-{params['kind']}-{_key(params, eval_set.fingerprint())}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        return data["bits"], json.loads(str(data["info"])), True
    bits = PerceptualHash(**params, progress=options.progress).fit_transform(LazyImages(eval_set))
    info = {"params": params, "bits": int(bits.shape[1])}
    _save_npz(cache, bits=bits, info=np.asarray(json.dumps(info)))
    return bits, info, False


def _save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _cnn_vectors(spec, eval_set, options, bundle=None):
    """Embed the evaluation images with build_index into a cached index, then read its vectors back in order."""
    from medsim.build import build_index
    from medsim.index import CaseIndex

    if bundle is None:
        bundle = resolve_cnn_bundle(spec)
    data_key = eval_set.fingerprint()
    view = options.cache_dir / f"images-{data_key}"
    _link_view(eval_set, view)
    index_dir = options.cache_dir / f"cnn-index-{bundle.fingerprint}-{data_key}"
    cached = (index_dir / "catalog.sqlite").exists()
    workers = max(0, min(options.jobs, os.cpu_count() or 1) - 1)
    report = build_index(view, index_dir, bundle, workers=workers, batch_size=options.batch_size,
                         progress=options.progress)
    if report.failures:
        raise MedsimError(f"{spec.title}: {len(report.failures)} image(s) failed to embed, e.g. "
                          f"{report.failures[0].path}: {report.failures[0].detail}")
    with CaseIndex.open(index_dir) as index:
        ids, vectors = index.vectors()
        by_path = {case.source_path: i for i, case in enumerate(index.cases())}
    order = []
    for item in eval_set.items:
        key = str(view.resolve() / item.rel_path)
        if key not in by_path:
            raise MedsimError(f"{spec.title}: {item.rel_path} is not in the evaluation index {index_dir}")
        order.append(by_path[key])
    vectors = vectors[np.asarray(order)]
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    info = {"bundle": bundle.name, "fingerprint": bundle.fingerprint, "bundle_path": str(bundle.path),
            "embedding_dim": int(bundle.embedding_dim), "index": str(index_dir),
            "embedded_now": report.indexed, "embedding_seconds": round(report.seconds, 1)}
    return vectors.astype(np.float32), info, cached and report.indexed == 0


def _link_view(eval_set, view: Path) -> None:
    """A folder of symbolic links to exactly the evaluation images (so build_index indexes only those)."""
    marker = view / ".complete"
    if marker.exists():
        return
    if view.exists():
        shutil.rmtree(view)
    for item in eval_set.items:
        link = view / item.rel_path
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(item.path)
        except OSError:
            shutil.copyfile(item.path, link)  # a file system without symbolic links
    marker.write_text("ok\n")
    print(f"medsim evaluate: image view {view} ({len(eval_set)} links)", file=sys.stderr)
