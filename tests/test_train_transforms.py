"""The MONAI transforms of `medsim train` (medsim/train/transforms.py) on real chest X-rays from ../shared/data/cxr:
dictionary transforms change only their ``keys``, and random ones are reproducible through ``set_random_state``."""

import csv

import numpy as np
import pytest
import torch
from monai.transforms import Compose, MapTransform, Randomizable

from medsim.preprocess import PreprocessSpec
from medsim.train.transforms import (
    AugmentSpec,
    BundlePreprocessd,
    LoadLetterboxd,
    LoadViewsd,
    PickViewd,
    RandFeatureJitter,
    RandPickViewd,
    RandRadiographAugmentd,
    TrunkInputd,
)

from conftest import SHARED_CXR

SPEC = PreprocessSpec()
AUG = AugmentSpec(seed=0)


@pytest.fixture(scope="module")
def paths():
    """Three real radiographs of different sources."""
    assert (SHARED_CXR / "labels.csv").is_file(), f"no real chest X-rays under {SHARED_CXR}"
    with open(SHARED_CXR / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    chosen, sources = [], set()
    for row in rows:
        if row["source"] not in sources:
            sources.add(row["source"])
            chosen.append(str(SHARED_CXR / row["path"]))
        if len(chosen) == 3:
            break
    return chosen


@pytest.fixture(scope="module")
def letterboxed(paths):
    """(1, h, w) float32 radiographs, longest side 224."""
    load = LoadLetterboxd("image", SPEC.image_size)
    return [load({"image": p})["image"] for p in paths]


def test_dictionary_transforms_change_only_their_keys(paths):
    item = {"image": paths[0], "other": paths[1], "index": 7}
    loaded = LoadLetterboxd("image", SPEC.image_size)(item)
    assert loaded["other"] == paths[1] and loaded["index"] == 7 and item["image"] == paths[0]  # input not mutated
    image = loaded["image"]
    assert image.dtype == np.float32 and image.ndim == 3 and image.shape[0] == 1 and max(image.shape[1:]) == 224
    assert 0.0 <= image.min() and image.max() <= 1.0

    both = LoadLetterboxd(["image", "other"], SPEC.image_size)(item)
    assert both["other"].shape[0] == 1 and not np.array_equal(both["image"], both["other"])

    prepared = BundlePreprocessd("image", SPEC)(loaded)
    assert isinstance(prepared["image"], torch.Tensor) and tuple(prepared["image"].shape) == (3, 224, 224)
    assert prepared["other"] == paths[1]

    augmented = RandRadiographAugmentd("image", AUG).set_random_state(seed=1)(loaded)
    assert augmented["other"] == paths[1] and augmented["image"].shape == image.shape
    assert not np.array_equal(augmented["image"], image)

    trunk = TrunkInputd("x", SPEC, AUG)({"x": paths[0], "sha256": "ab" * 32, "view": 0, "image": paths[1]})
    assert tuple(trunk["x"].shape) == (3, 224, 224) and trunk["image"] == paths[1]

    with pytest.raises(KeyError):
        LoadLetterboxd("missing", SPEC.image_size)(item)
    assert LoadLetterboxd("missing", SPEC.image_size, allow_missing_keys=True)(item) == item
    for t in (LoadLetterboxd("image", 224), BundlePreprocessd("image", SPEC), RandRadiographAugmentd("image", AUG),
              TrunkInputd("image", SPEC, AUG), LoadViewsd("image"), PickViewd("image"), RandPickViewd("image")):
        assert isinstance(t, MapTransform) and t.keys == ("image",)


def test_image_augmentation_is_reproducible_with_set_random_state(letterboxed, paths):
    image = {"image": letterboxed[0]}

    def draws(seed, n=3):
        t = RandRadiographAugmentd("image", AUG).set_random_state(seed=seed)
        return [t(image)["image"] for _ in range(n)]

    a, b, c = draws(5), draws(5), draws(6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], a[1])  # each call draws anew
    assert not np.array_equal(a[0], c[0])
    t = RandRadiographAugmentd("image", AUG).set_random_state(state=np.random.RandomState(5))
    assert np.array_equal(t(image)["image"], a[0])

    # a Compose seeds its random transforms (as MONAI's DataLoader does from the training seed)
    def pipeline(seed):
        return Compose([LoadLetterboxd("image", SPEC.image_size), RandRadiographAugmentd("image", AUG),
                        BundlePreprocessd("image", SPEC)]).set_random_state(seed=seed)

    x, y = pipeline(3)({"image": paths[1]}), pipeline(3)({"image": paths[1]})
    z = pipeline(4)({"image": paths[1]})
    assert torch.equal(x["image"], y["image"]) and not torch.equal(x["image"], z["image"])
    assert isinstance(RandRadiographAugmentd("image", AUG), Randomizable)


def test_trunk_views_are_seeded_by_the_item(paths):
    t = TrunkInputd("input", SPEC, AUG)
    item = {"input": paths[0], "sha256": "ab" * 32, "view": 1}
    v1, again = t(item)["input"], TrunkInputd("input", SPEC, AUG)(item)["input"]
    assert torch.equal(v1, again)  # deterministic: the same view in every run
    v0 = t({**item, "view": 0})["input"]
    other_file = t({**item, "sha256": "cd" * 32})["input"]
    other_seed = TrunkInputd("input", SPEC, AugmentSpec(seed=1))(item)["input"]
    assert not torch.equal(v1, v0) and not torch.equal(v1, other_file) and not torch.equal(v1, other_seed)
    assert torch.equal(v0, t({**item, "view": 0, "sha256": "cd" * 32})["input"])  # view 0 is never augmented


def test_cached_views_load_and_pick(letterboxed, tmp_path):
    files = []
    for n, image in enumerate(letterboxed):
        files.append(str(tmp_path / f"view{n}.npy"))
        np.save(files[-1], image[:, :128, :128].astype(np.float16))  # one "activation map" per view
    item = {"views": files, "labels": np.ones(3, np.float32)}
    loaded = LoadViewsd("views")(item)
    assert loaded["views"].shape == (3, 1, 128, 128) and loaded["views"].dtype == np.float16
    assert loaded["labels"] is item["labels"]
    assert LoadViewsd("views", torch.nn.Sequential())(item)["views"].shape == (3, 1, 128, 128)  # no frozen layers

    def view(i):
        return torch.from_numpy(loaded["views"][i].astype(np.float32))

    first = PickViewd("views")(loaded)["views"]
    assert first.dtype == torch.float32 and torch.equal(first, view(0))
    assert torch.equal(view(0), torch.from_numpy(letterboxed[0][:, :128, :128].astype(np.float16).astype(np.float32)))
    assert torch.equal(PickViewd("views", 2)(loaded)["views"], view(2))

    def picks(seed, n=30):
        t = RandPickViewd("views").set_random_state(seed=seed)
        out = []
        for _ in range(n):
            picked = t(loaded)["views"]
            out.append(next(i for i in range(3) if torch.equal(picked, view(i))))
        return out

    a = picks(11)
    assert a == picks(11) and a != picks(12) and set(a) == {0, 1, 2}
    assert RandPickViewd("views")(loaded)["labels"] is item["labels"]


def test_feature_jitter_is_reproducible_and_per_image(letterboxed):
    batch = torch.from_numpy(np.stack([image[:, :128, :128] for image in letterboxed]))  # (3, 1, 128, 128)
    a = RandFeatureJitter(prob=1.0).set_random_state(seed=4)
    b = RandFeatureJitter(prob=1.0).set_random_state(seed=4)
    out_a, out_b = a(batch), b(batch)
    assert torch.equal(out_a, out_b) and out_a.shape == batch.shape
    assert all(not torch.equal(out_a[i], batch[i]) for i in range(len(batch)))
    assert not torch.equal(a(batch), out_a)  # the next batch draws anew
    assert torch.equal(a(batch, randomize=False), a(batch, randomize=False))  # the last parameters again
    assert not torch.equal(RandFeatureJitter(prob=1.0).set_random_state(seed=5)(batch), out_b)
    def from_state(seed):
        return RandFeatureJitter(prob=1.0).set_random_state(state=np.random.RandomState(seed))

    assert torch.equal(from_state(4)(batch), from_state(4)(batch))
    assert not torch.equal(from_state(4)(batch), from_state(5)(batch))

    assert torch.equal(RandFeatureJitter(prob=0.0)(batch), batch)
    assert torch.equal(RandFeatureJitter(prob=1.0)(batch[0]), batch[0])  # not a batch: unchanged
