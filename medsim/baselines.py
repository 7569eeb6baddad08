"""Classical image-retrieval baselines for chest X-rays, in scikit-learn style (parameters in ``__init__``,
``fit`` returns self, learned state ends in ``_``).

* :class:`BagOfVisualWords`: local keypoint descriptors (OpenCV SIFT, ORB, KAZE, AKAZE, and SURF where the OpenCV
  build has it) quantised against a visual vocabulary learned with k-means on the gallery, tf-idf weighted,
  L2-normalised; similarity = cosine.
* :class:`PerceptualHash`: pHash / dHash (the ``imagehash`` package); similarity = 1 - Hamming distance / bits.

SURF is patented and lives in OpenCV's non-free module, which the OpenCV wheels on PyPI are built without
(``cv2.xfeatures2d.SURF_create`` raises "This algorithm is patented and is excluded in this configuration").
``make_detector("surf")`` therefore raises :class:`DetectorUnavailable` with OpenCV's own message unless the
installed OpenCV was built with ``OPENCV_ENABLE_NONFREE``. KAZE is the nearest available detector: like SURF it
finds maxima of the Hessian determinant across scales (in a non-linear instead of a box-filter scale space) and
describes them with a 64-d M-SURF-style descriptor; it is reported as KAZE, never as SURF.

Images are 2-D arrays: float in [0, 1] (as :func:`medsim.ingest.read_any` gives) or uint8.

Needs the ``evaluate`` extra: ``pip install 'medsim[evaluate]'`` (opencv-contrib-python-headless, imagehash).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from medsim.errors import MedsimError

DETECTORS = ("sift", "orb", "kaze", "akaze", "surf")
BINARY_DETECTORS = ("orb", "akaze")
DETECTOR_TITLES = {"sift": "SIFT", "orb": "ORB", "kaze": "KAZE", "akaze": "AKAZE", "surf": "SURF"}


class DetectorUnavailable(MedsimError):
    """The installed OpenCV does not provide this keypoint detector."""


def _cv2():
    try:
        import cv2
    except ImportError:
        raise MedsimError("the SIFT/ORB/KAZE baselines need OpenCV: pip install 'medsim[evaluate]'") from None
    return cv2


def _feature_factory(name: str):
    """The OpenCV constructor for a detector (main module first, then xfeatures2d: OpenCV 5 moved KAZE there)."""
    cv2 = _cv2()
    attr = {"sift": "SIFT_create", "orb": "ORB_create", "kaze": "KAZE_create", "akaze": "AKAZE_create",
            "surf": "SURF_create"}[name]
    for module in (cv2, getattr(cv2, "xfeatures2d", None)):
        if module is not None and hasattr(module, attr):
            return getattr(module, attr)
    raise DetectorUnavailable(f"{DETECTOR_TITLES[name]}: OpenCV {cv2.__version__} has no {attr} "
                              "(install opencv-contrib-python-headless)")


def make_detector(name: str, n_features: int = 500):
    """An OpenCV Feature2D for ``name``; raises DetectorUnavailable (with OpenCV's reason) when it cannot be made."""
    name = name.lower()
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; one of {', '.join(DETECTORS)}")
    cv2 = _cv2()
    factory = _feature_factory(name)
    try:
        if name in ("sift", "orb"):
            return factory(nfeatures=int(n_features))
        if name == "surf":
            return factory(hessianThreshold=400.0)
        return factory()
    except cv2.error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        raise DetectorUnavailable(f"{DETECTOR_TITLES[name]} is not available in this OpenCV build "
                                  f"({cv2.__version__}): {reason}") from None


def detector_status(name: str) -> tuple[bool, str]:
    """(available, reason-or-OpenCV version) for a detector name."""
    try:
        make_detector(name)
    except (DetectorUnavailable, MedsimError) as exc:
        return False, str(exc)
    return True, f"OpenCV {_cv2().__version__}"


def to_uint8(image: np.ndarray, image_size: int | None = 512, clahe: bool = True) -> np.ndarray:
    """A 2-D uint8 image, longest side resized to ``image_size`` (area when shrinking, bilinear when enlarging),
    contrast-limited adaptive histogram equalisation when ``clahe``."""
    cv2 = _cv2()
    array = np.asarray(image)
    if array.ndim == 3:
        array = array.mean(axis=2)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(np.asarray(array, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    if image_size:
        h, w = array.shape
        scale = image_size / max(h, w)
        if abs(scale - 1.0) > 1e-6:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            array = cv2.resize(array, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if clahe:
        array = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(array)
    return np.ascontiguousarray(array)


# ---- keypoint extraction (also runs in worker processes) ----------------------------------------------------------

_WORKER_STATE: dict = {}


def _init_extractor(detector: str, n_features: int, image_size: int | None, clahe: bool) -> None:
    _cv2().setNumThreads(1)
    _WORKER_STATE.update(detector=detector, n_features=n_features, image_size=image_size, clahe=clahe,
                         feature2d=make_detector(detector, n_features))


def _extract(image) -> np.ndarray:
    """Descriptors of one image in compact form: float16 (float descriptors) or packed uint8 bits (binary)."""
    state = _WORKER_STATE
    gray = to_uint8(image, state["image_size"], state["clahe"])
    keypoints, descriptors = state["feature2d"].detectAndCompute(gray, None)
    binary = state["detector"] in BINARY_DETECTORS
    if descriptors is None or len(keypoints) == 0:
        return np.zeros((0, 0), dtype=np.uint8 if binary else np.float16)
    if len(keypoints) > state["n_features"]:
        strongest = np.argsort([-kp.response for kp in keypoints], kind="stable")[: state["n_features"]]
        descriptors = descriptors[np.sort(strongest)]
    return descriptors.astype(np.uint8) if binary else descriptors.astype(np.float16)


def _extract_many(images) -> list[np.ndarray]:
    return [_extract(image) for image in images]


def _bounded_map(pool, images: Iterable, window: int, chunk: int = 4):
    """Descriptors of the images in order, with at most ``window`` chunks in flight (images are read lazily)."""
    from collections import deque

    pending: deque = deque()
    iterator = iter(images)
    exhausted = False
    while True:
        while not exhausted and len(pending) < window:
            batch = []
            for image in iterator:
                batch.append(image)
                if len(batch) == chunk:
                    break
            if not batch:
                exhausted = True
                break
            pending.append(pool.submit(_extract_many, batch))
        if not pending:
            return
        yield from pending.popleft().result()


def _as_float(descriptors: np.ndarray, binary: bool) -> np.ndarray:
    if binary:
        return np.unpackbits(descriptors, axis=1).astype(np.float32)
    return descriptors.astype(np.float32)


# ---- k-means -----------------------------------------------------------------------------------------------------


def _nearest(x: np.ndarray, centers: np.ndarray, center_sq: np.ndarray | None = None, chunk: int = 8192):
    """Index of and squared distance to the nearest center for every row of x."""
    if center_sq is None:
        center_sq = (centers * centers).sum(axis=1)
    labels = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), chunk):
        block = x[start:start + chunk]
        d = center_sq[None, :] - 2.0 * (block @ centers.T)
        labels[start:start + chunk] = np.argmin(d, axis=1)
        dist[start:start + chunk] = np.maximum(
            d[np.arange(len(block)), labels[start:start + chunk]] + (block * block).sum(axis=1), 0.0)
    return labels, dist


def kmeans(x: np.ndarray, k: int, iterations: int = 25, seed: int = 0, tol: float = 1e-4):
    """Lloyd's k-means with k-means++ seeding; returns (centers, inertia). Empty clusters take the worst-fit points."""
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    if n == 0:
        raise ValueError("k-means on no data")
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    centers[0] = x[rng.integers(n)]
    closest = ((x - centers[0]) ** 2).sum(axis=1)
    for j in range(1, k):
        total = float(closest.sum())
        idx = int(rng.choice(n, p=closest / total)) if total > 0 else int(rng.integers(n))
        centers[j] = x[idx]
        closest = np.minimum(closest, ((x - centers[j]) ** 2).sum(axis=1))
    previous = np.inf
    inertia = np.inf
    for _ in range(iterations):
        labels, dist = _nearest(x, centers)
        inertia = float(dist.sum())
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=k)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        nonempty = counts > 0
        sums = np.add.reduceat(x[order], starts[nonempty], axis=0)
        centers[nonempty] = sums / counts[nonempty, None]
        empty = np.flatnonzero(~nonempty)
        if len(empty):
            worst = np.argsort(-dist)[: len(empty)]
            centers[empty] = x[worst]
        if previous - inertia <= tol * max(previous, 1e-12) and not len(empty):
            break
        previous = inertia
    return centers, inertia


# ---- bag of visual words -----------------------------------------------------------------------------------------


class BagOfVisualWords:
    """Keypoint descriptors -> visual-word histogram -> tf-idf -> L2-normalised vector (cosine similarity).

    detector: "sift", "orb", "kaze", "akaze" or "surf" (OpenCV).
    vocabulary_size: visual words (k of k-means; lowered to the number of training descriptors if fewer).
    n_features: at most this many keypoints per image (the strongest by detector response).
    image_size: longest side the image is resized to before detection; clahe: equalise contrast first.
    max_training_descriptors: k-means runs on a random sample of at most this many descriptors.
    Binary descriptors (ORB, AKAZE) are unpacked to 0/1 vectors, so the squared Euclidean distance of k-means is
    their Hamming distance.

    Learned: ``vocabulary_`` (words x descriptor dims), ``idf_``, ``n_training_descriptors_``,
    ``descriptors_per_image_`` (mean over the fit images), ``images_without_keypoints_``.
    """

    def __init__(self, detector: str = "sift", vocabulary_size: int = 1000, n_features: int = 500,
                 image_size: int | None = 512, clahe: bool = True, max_training_descriptors: int = 100_000,
                 kmeans_iterations: int = 25, random_state: int = 0, n_jobs: int = 1, progress: bool = False):
        self.detector = detector
        self.vocabulary_size = vocabulary_size
        self.n_features = n_features
        self.image_size = image_size
        self.clahe = clahe
        self.max_training_descriptors = max_training_descriptors
        self.kmeans_iterations = kmeans_iterations
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.progress = progress

    @property
    def binary(self) -> bool:
        return self.detector.lower() in BINARY_DETECTORS

    def extract(self, images: Iterable, total: int | None = None) -> list[np.ndarray]:
        """Descriptors of every image (compact form), in order; parallel over ``n_jobs`` processes."""
        from tqdm import tqdm

        detector = self.detector.lower()
        make_detector(detector, self.n_features)  # fail fast, in this process, with OpenCV's reason
        if total is None and isinstance(images, Sequence):
            total = len(images)
        bar = tqdm(total=total, unit="img", desc=f"{detector} keypoints", disable=not self.progress,
                   dynamic_ncols=True)
        args = (detector, self.n_features, self.image_size, self.clahe)
        out = []
        try:
            if self.n_jobs and self.n_jobs > 1:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(self.n_jobs, mp_context=context, initializer=_init_extractor,
                                         initargs=args) as pool:
                    for descriptors in _bounded_map(pool, images, window=4 * self.n_jobs):
                        out.append(descriptors)
                        bar.update(1)
            else:
                saved = dict(_WORKER_STATE)
                _init_extractor(*args)
                try:
                    for image in images:
                        out.append(_extract(image))
                        bar.update(1)
                finally:
                    _WORKER_STATE.clear()
                    _WORKER_STATE.update(saved)
        finally:
            bar.close()
        return out

    def _words(self, descriptors: list[np.ndarray]) -> list[np.ndarray]:
        center_sq = (self.vocabulary_ * self.vocabulary_).sum(axis=1)
        words = []
        for d in descriptors:
            if len(d) == 0:
                words.append(np.zeros(0, dtype=np.int64))
            else:
                words.append(_nearest(_as_float(d, self.binary), self.vocabulary_, center_sq)[0])
        return words

    def _histograms(self, words: list[np.ndarray]) -> np.ndarray:
        counts = np.zeros((len(words), len(self.vocabulary_)), dtype=np.float32)
        for i, w in enumerate(words):
            if len(w):
                counts[i] = np.bincount(w, minlength=len(self.vocabulary_))
        return counts

    def _fit_descriptors(self, descriptors: list[np.ndarray]) -> "BagOfVisualWords":
        rng = np.random.default_rng(self.random_state)
        sizes = np.asarray([len(d) for d in descriptors])
        total = int(sizes.sum())
        if total == 0:
            raise MedsimError(f"{self.detector}: no keypoints found in any of {len(descriptors)} images")
        if total > self.max_training_descriptors:
            chosen = np.sort(rng.choice(total, self.max_training_descriptors, replace=False))
        else:
            chosen = np.arange(total)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        image_of = np.searchsorted(offsets, chosen, side="right") - 1
        sample = np.concatenate([
            _as_float(descriptors[i][chosen[image_of == i] - offsets[i]], self.binary)
            for i in np.unique(image_of)
        ])
        self.vocabulary_, self.inertia_ = kmeans(sample, self.vocabulary_size, self.kmeans_iterations,
                                                 self.random_state)
        self.n_training_descriptors_ = len(sample)
        self.descriptors_per_image_ = float(sizes.mean())
        self.images_without_keypoints_ = int((sizes == 0).sum())
        self._fit_words = self._words(descriptors)
        counts = self._histograms(self._fit_words)
        document_frequency = (counts > 0).sum(axis=0)
        n = len(descriptors)
        self.idf_ = (np.log((1.0 + n) / (1.0 + document_frequency)) + 1.0).astype(np.float32)
        self._fit_counts = counts
        return self

    def fit(self, images: Iterable) -> "BagOfVisualWords":
        """Learn the vocabulary and the idf weights from the (gallery) images."""
        self._fit_descriptors(self.extract(images))
        self._drop_fit_cache()
        return self

    def fit_transform(self, images: Iterable) -> np.ndarray:
        """fit, then the vectors of the same images (their keypoints are extracted once)."""
        self._fit_descriptors(self.extract(images))
        vectors = self._vectors(self._fit_counts)
        self._drop_fit_cache()
        return vectors

    def _drop_fit_cache(self) -> None:
        self._fit_words = None
        self._fit_counts = None

    def transform(self, images: Iterable) -> np.ndarray:
        """(N, vocabulary_size) float32, tf-idf weighted, unit L2 norm (all zero for an image without keypoints)."""
        self._check_fitted()
        return self._vectors(self._histograms(self._words(self.extract(images))))

    def _vectors(self, counts: np.ndarray) -> np.ndarray:
        totals = counts.sum(axis=1, keepdims=True)
        tf = counts / np.maximum(totals, 1.0)
        x = tf * self.idf_[None, :]
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return (x / np.maximum(norms, 1e-12)).astype(np.float32)

    def _check_fitted(self) -> None:
        if not hasattr(self, "vocabulary_"):
            raise MedsimError("BagOfVisualWords is not fitted; call fit() first")

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
        """Cosine similarity of tf-idf vectors (rows of a against rows of b, default a)."""
        b = a if b is None else b
        return np.asarray(a, dtype=np.float32) @ np.asarray(b, dtype=np.float32).T


# ---- perceptual hashes -------------------------------------------------------------------------------------------


HASHES = ("phash", "dhash")


class PerceptualHash:
    """pHash (DCT of a 32x32 thumbnail, sign against the median of the low 8x8 frequencies) or dHash (sign of
    horizontal gradients of a 9x8 thumbnail), via the ``imagehash`` package; ``hash_size`` 8 gives 64 bits.
    Similarity = 1 - Hamming distance / bits. Stateless: ``fit`` records only ``n_bits_``."""

    def __init__(self, kind: str = "phash", hash_size: int = 8, progress: bool = False):
        self.kind = kind
        self.hash_size = hash_size
        self.progress = progress

    def fit(self, images: Iterable = ()) -> "PerceptualHash":
        if self.kind not in HASHES:
            raise ValueError(f"unknown hash {self.kind!r}; one of {', '.join(HASHES)}")
        self.n_bits_ = self.hash_size * self.hash_size
        return self

    def fit_transform(self, images: Iterable) -> np.ndarray:
        return self.fit().transform(images)

    def transform(self, images: Iterable) -> np.ndarray:
        """(N, bits) bool hash bits."""
        from tqdm import tqdm

        try:
            import imagehash
            from PIL import Image
        except ImportError:
            raise MedsimError("the hash baselines need imagehash: pip install 'medsim[evaluate]'") from None
        if not hasattr(self, "n_bits_"):
            self.fit()
        function = {"phash": imagehash.phash, "dhash": imagehash.dhash}[self.kind]
        total = len(images) if isinstance(images, Sequence) else None
        rows = []
        for image in tqdm(images, total=total, unit="img", desc=self.kind, disable=not self.progress,
                          dynamic_ncols=True):
            gray = to_uint8(image, image_size=None, clahe=False)
            rows.append(np.asarray(function(Image.fromarray(gray), hash_size=self.hash_size).hash).ravel())
        return np.asarray(rows, dtype=bool).reshape(len(rows), self.n_bits_)

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
        """1 - Hamming distance / bits between all rows of a and b (default a)."""
        b = a if b is None else b
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
        bits = a.shape[1]
        hamming = a @ (1.0 - b).T + (1.0 - a) @ b.T
        return (1.0 - hamming / bits).astype(np.float32)

