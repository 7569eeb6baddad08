"""Post-hoc re-ranking on a bundle's validation split (issue 18): does query expansion or database-side augmentation
raise NIH per-finding retrieval, the measure the product's promise is judged by?

    MEDSIM_HOME=... python -m benchmarks.rerank_probe [--bundle default] [--images ../shared/data/cxr]

The bundle's validation patients, embedded through `medsim evaluate`'s path (cached index); every image queries
every other, its own patient excluded. Rankings compared with the plain cosine ranking on the same queries:

* alpha-QE (k, alpha): the query plus its top-k valid neighbours weighted by similarity^alpha, searched again (one
  extra search per query; no change to the index);
* DBA (k): every vector replaced by itself plus its k nearest neighbours (similarity^3 weights), alone and with QE
  (k = 2) on top (a change to every stored vector).

Prints one line per ranking and writes ``--out`` (default ``var/rerank_probe.json``: whole-split mAP@10, NIH
per-finding macro mAP@10, random figure, paired difference to the plain ranking with a 95 % patient-bootstrap
interval).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import shared_data
from medsim.evaluate import metrics as M
from medsim.evaluate.calibrate import validation_patients
from medsim.evaluate.data import load_eval_set
from medsim.evaluate.methods import MethodOptions, _cnn_vectors, default_cache_dir, expand_methods
from medsim.model import resolve_bundle
from medsim.train.validation import _per_query_ap

OUT = Path(__file__).resolve().parents[1] / "var" / "rerank_probe.json"


def _neighbours(scores: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-np.where(valid, scores, -np.inf), axis=1)[:, :k]


def _expand(vectors: np.ndarray, scores: np.ndarray, valid: np.ndarray, k: int, alpha: float) -> np.ndarray:
    idx = _neighbours(scores, valid, k)
    weights = np.take_along_axis(scores, idx, 1).clip(min=0) ** alpha
    out = vectors + (weights[:, :, None] * vectors[idx]).sum(axis=1)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def rankings(x: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
    """name -> (N, N) scores of every re-ranking the probe compares."""
    plain = x @ x.T
    out = {"plain": plain}
    for k in (1, 2, 3, 5, 10):
        for alpha in (0, 3):
            out[f"QE k={k} alpha={alpha}"] = _expand(x, plain, valid, k, alpha) @ x.T
    not_self = ~np.eye(len(x), dtype=bool)
    for k in (1, 2, 3, 5):
        d = _expand(x, plain, not_self, k, 3)
        out[f"DBA k={k}"] = d @ d.T
        out[f"DBA k={k} + QE k=2"] = _expand(d, d @ d.T, valid, 2, 3) @ d.T
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="default")
    parser.add_argument("--images", type=Path, default=shared_data() / "cxr")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    bundle = resolve_bundle(args.bundle)
    patients = validation_patients(bundle)
    if not patients:
        parser.error(f"bundle {bundle.name} records no validation split")
    data = load_eval_set(args.images, args.images / "labels.csv").only_patients(patients, "validation")
    spec = expand_methods(["cnn-finetuned"])[0][0]
    x, _, _ = _cnn_vectors(spec, data, MethodOptions(cache_dir=default_cache_dir(), jobs=1, progress=False), bundle)
    x = x.astype(np.float64)
    labels, pats, sources = data.labels, data.patients, data.sources
    ids = np.arange(len(data))
    valid = ~M.exclusion_mask(ids, ids, list(pats), list(pats))
    rows, plain = {}, None
    for name, scores in rankings(x, valid).items():
        findings, weights = M.nih_finding_ap(scores, labels, pats, sources)
        summary = M.finding_summary(findings, weights, other=None if plain is None else plain)
        plain = findings if plain is None else plain
        row = {"mAP@10": M.mean_over_queries(_per_query_ap(scores, labels, pats, 10)),
               "finding_macro": summary["macro"], "finding_random": summary["random_macro"]}
        if "vs_other" in summary:
            row.update(finding_delta=summary["vs_other"]["delta"], finding_delta_ci95=summary["vs_other"]["ci95"])
        rows[name] = row
        delta = (f"  paired {row['finding_delta']:+.3f} ({row['finding_delta_ci95'][0]:+.3f} .. "
                 f"{row['finding_delta_ci95'][1]:+.3f})" if "finding_delta" in row else "")
        print(f"{name:22s} mAP@10 {row['mAP@10']:.3f}  per-finding {row['finding_macro']:.3f} "
              f"(random {row['finding_random']:.3f}){delta}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bundle": bundle.name, "fingerprint": bundle.fingerprint,
                                   "validation_images": len(data), "rankings": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
