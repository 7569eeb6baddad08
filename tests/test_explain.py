"""Where two images match (issue 15, part 1): the score decomposed over the 14 x 14 positions of each image.

On real chest X-rays (the sample export): the maps sum to the float32 score (|sum - score| <= 1e-4), which is the
score the model's own float32 embeddings give; blurring the regions the map ranks highest lowers the score more than
blurring random regions of the same area (a deletion check); the overlay lines up with the image (letterbox undone,
aspect ratio kept). And the API: GET /api/v1/explain."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from conftest import SAMPLE_DIR
from orthanc_fixtures import make_app, pacs, service  # noqa: F401
from PIL import Image

from medsim.explain import (
    Explainer,
    ExplainError,
    content_box,
    map_on_image,
    overlay_png,
    overlay_size,
)
from medsim.preprocess import prepare


def _sample_images(n: int):
    """n display-ready radiographs of the sample export (real chest X-rays, DICOM), one per patient."""
    import csv

    from medsim.ingest import read_any

    out, patients = [], set()
    with open(SAMPLE_DIR / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["expected"] != "index" or row["patient_id"] in patients:
                continue
            patients.add(row["patient_id"])
            out.append(read_any(SAMPLE_DIR / row["path"]))
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="module")
def explainer(bundle):
    return Explainer.for_bundle(bundle)


@pytest.fixture(scope="module")
def images():
    return _sample_images(4)


def test_maps_sum_to_the_score(explainer, bundle, images):
    embedder = bundle.embedder(mode="fp32")
    vectors = embedder.embed([im.pixels for im in images])
    features = [explainer.features(im.pixels) for im in images]
    for i, j in ((0, 1), (2, 3), (1, 3)):
        result = explainer.explain(features[i], features[j])
        assert result.hit_map.shape == result.query_map.shape == (14, 14)
        assert abs(result.hit_map.sum() - result.score) <= 1e-4
        assert abs(result.query_map.sum() - result.score) <= 1e-4
        assert abs(result.score - float(vectors[i] @ vectors[j])) <= 1e-4  # the model's own float32 score
        swapped = explainer.explain(features[j], features[i])  # symmetric: the roles swap, the maps with them
        np.testing.assert_allclose(swapped.hit_map, result.query_map, atol=1e-9)


def _blur_cells(array: np.ndarray, blurred: np.ndarray, cells, cell: int) -> np.ndarray:
    out = array.copy()
    for r, c in cells:
        out[:, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = blurred[:, r * cell:(r + 1) * cell,
                                                                           c * cell:(c + 1) * cell]
    return out


def test_deleting_the_top_regions_lowers_the_score_more_than_random_regions(explainer, images):
    """Deletion check on real images: blur the hit's highest-contribution cells (10 % and 25 % of the 196) and, as
    the control, regions of the same area *and shape* at random places (the top mask shifted, so both deletions make
    as many blur edges). Summed over both sizes, the top regions must cost more score, on most pairs and on average
    by a wide margin."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    spec = explainer.spec
    grid, cell = 14, spec.image_size // 14
    shape = images[0].pixels.shape

    def score_without(query, hit_input, blurred, mask, image_shape):
        cells = list(zip(*np.nonzero(mask)))
        features = explainer.features_of_input(_blur_cells(hit_input, blurred, cells, cell), image_shape)
        return explainer.explain(query, features).score

    drops_top, drops_random = [], []
    for i, j in ((0, 1), (2, 3), (3, 0), (1, 2)):
        shape = images[j].pixels.shape
        query = explainer.features(images[i].pixels)
        hit_input = prepare(images[j].pixels, spec).array
        base = explainer.explain(query, explainer.features_of_input(hit_input, shape))
        blurred = gaussian_filter(hit_input, sigma=(0, 8, 8))
        order = np.argsort(-base.hit_map.ravel())
        top_drop = random_drop = 0.0
        for count in (20, 49):
            mask = np.zeros(grid * grid, bool)
            mask[order[:count]] = True
            mask = mask.reshape(grid, grid)
            top_drop += base.score - score_without(query, hit_input, blurred, mask, shape)
            shifts = [tuple(rng.integers(3, grid - 3, size=2)) for _ in range(3)]
            random_drop += float(np.mean([base.score - score_without(query, hit_input, blurred,
                                                                     np.roll(mask, shift, axis=(0, 1)), shape)
                                          for shift in shifts]))
        drops_top.append(top_drop)
        drops_random.append(random_drop)
    print("deletion (10 % + 25 % of the cells): top", np.round(drops_top, 4), "random", np.round(drops_random, 4))
    assert sum(t > r for t, r in zip(drops_top, drops_random)) >= 3
    assert np.mean(drops_top) > 1.5 * np.mean(drops_random)


@pytest.mark.parametrize("shape", [(300, 600), (600, 300), (512, 512), (401, 250)])
def test_letterbox_and_overlay_line_up_with_the_image(bundle, shape):
    spec = bundle.preprocess
    box = content_box(shape, spec)
    array = prepare(np.ones(shape, np.float32), spec).array  # white image: the padding is the only other value
    pad = prepare(np.zeros(shape, np.float32), spec).array[:, 0, 0]
    inside = np.zeros((spec.image_size, spec.image_size), bool)
    inside[box.top:box.top + box.height, box.left:box.left + box.width] = True
    padded = np.all(np.isclose(array, pad[:, None, None]), axis=0)
    assert (padded == ~inside).all()  # the box is exactly where prepare() put the image
    assert abs(box.width / box.height - shape[1] / shape[0]) < 0.02
    # a hot grid cell lands where that part of the input lies on the image
    out_shape = overlay_size(shape, 200)
    assert abs(out_shape[1] / out_shape[0] - shape[1] / shape[0]) < 0.02 and max(out_shape) == 200
    cell = spec.image_size // 14
    for r, c in ((box.top // cell + 1, box.left // cell + 1), (7, 7)):
        values = np.zeros((14, 14), np.float32)
        values[r, c] = 1.0
        on_image = map_on_image(values, box, out_shape)
        y, x = np.unravel_index(np.argmax(on_image), on_image.shape)
        expect_y = ((r + 0.5) * cell - box.top) / box.height * out_shape[0]
        expect_x = ((c + 0.5) * cell - box.left) / box.width * out_shape[1]
        tolerance = cell / box.height * out_shape[0]
        assert abs(y - expect_y) <= tolerance and abs(x - expect_x) <= cell / box.width * out_shape[1]
    png = Image.open(io.BytesIO(overlay_png(np.random.default_rng(1).random((14, 14)), box, shape, 200)))
    assert png.mode == "RGBA" and png.size == (out_shape[1], out_shape[0])


def test_gem_models_are_refused(bundle):
    with pytest.raises(ExplainError, match="average pooling"):
        Explainer(bundle.network(), bundle.preprocess, {"type": "gem", "p": 3.0})


# ---- the API ---------------------------------------------------------------------------------------------------------


def _png(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def test_api_explain(make_app, pacs):
    client = make_app().test_client()
    query = pacs.indexed[0]
    hits = client.post("/api/v1/similar", json={"sop_uid": query.sop_uid, "k": 2, "threshold": "none"}).get_json()
    hit = hits["results"][0]
    response = client.get(f"/api/v1/explain?query={query.sop_uid}&hit={hit['sop_uid']}&size=128")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["grid"] == [14, 14] and body["model"]["pooling"] == "gap"
    for side in ("query", "hit"):
        values = np.asarray(body[side]["map"])
        assert values.shape == (14, 14)
        assert abs(values.sum() - body["score"]) <= 1e-4 and abs(body[side]["sum"] - body["score"]) <= 1e-5
        image = _png(body[side]["overlay"])
        rows, columns = body[side]["image"]["rows"], body[side]["image"]["columns"]
        assert max(image.size) == 128 and abs(image.size[0] / image.size[1] - columns / rows) < 0.02
    assert body["hit"]["sop_uid"] == hit["sop_uid"]
    # the indexed vectors come from the embedding mode in use (bf16/int8 may differ from float32 slightly)
    assert abs(body["indexed_score"] - hit["score"]) < 1e-5 and abs(body["score"] - hit["score"]) < 0.02
    again = client.get(f"/api/v1/explain?query={query.sop_uid}&hit={hit['sop_uid']}&size=128").get_json()
    assert again["score"] == body["score"]  # cached feature maps


def test_api_explain_non_indexed_query_and_errors(make_app, pacs):
    client = make_app().test_client()
    other = pacs.pacs_only[0]
    hit = pacs.indexed[0].sop_uid
    response = client.get(f"/api/v1/explain?query={other.sop_uid}&hit={hit}&study_uid={other.study_uid}"
                          f"&series_uid={other.series_uid}")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["indexed_score"] is None and abs(np.asarray(body["hit"]["map"]).sum() - body["score"]) <= 1e-4
    for url, status, code in (
        (f"/api/v1/explain?query={other.sop_uid}&hit={hit}", 404, "not-indexed"),
        (f"/api/v1/explain?query={hit}&hit={other.sop_uid}", 404, "not-indexed"),
        (f"/api/v1/explain?query={hit}", 400, "bad-request"),
        (f"/api/v1/explain?query=abc&hit={hit}", 400, "invalid-uid"),
        (f"/api/v1/explain?query={hit}&hit={hit}&size=5", 400, "invalid-parameter"),
        (f"/api/v1/explain?query={hit}&hit={hit}&colour=red", 400, "unknown-field"),
    ):
        response = client.get(url)
        assert response.status_code == status, (url, response.get_json())
        assert response.get_json()["error"]["code"] == code
        assert not re.search(r"Traceback|\.py", response.get_data(as_text=True))
