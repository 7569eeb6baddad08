"""Ensembles of model-card runs (issue 18): does joining two runs' embeddings -- the general model and its
second stage, say, which share the frozen VGG-16 trunk and so would cost one more conv5_3 + head per image --
raise NIH per-finding retrieval over either run alone?

    python -m benchmarks.ensemble_probe var/model-card [var/model-card-s1 ...] [--combos default+two,base+two]

Reads each folder's saved validation embeddings (``runs/NAME/validation_embeddings.npz``, written by
``benchmarks.model_card``); an ensemble is the L2-normalised concatenation of its runs' L2-normalised embeddings
(cosine = the mean of the runs' cosines). Prints, per folder and per run or ensemble, whole-split mAP@10, NIH
mAP@10, NIH per-finding macro mAP@10 with its random figure, the same-source share, and the paired difference to
``--reference`` (95 % patient-bootstrap intervals); writes ``--out`` (default ``var/ensemble_probe.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medsim.train.validation import headline, paired_difference, retrieval_report

OUT = Path(__file__).resolve().parents[1] / "var" / "ensemble_probe.json"


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def probe(folder: Path, combos: list[str], reference: str) -> dict:
    """{run or ensemble: headline figures + paired differences to ``reference``} for one model-card folder."""
    names = sorted({n for combo in combos + [reference] for n in combo.split("+")})
    saved = {n: np.load(folder / "runs" / n / "validation_embeddings.npz") for n in names}
    ref = saved[reference]
    for n, e in saved.items():
        if list(e["paths"]) != list(ref["paths"]):
            raise SystemExit(f"{folder}: run {n} validated on other images than {reference}")
    labels = [tuple(x.split("|")) if x else () for x in ref["labels"]]
    patients, sources = list(ref["patients"]), list(ref["sources"])
    rows = {}
    for combo in [reference] + [c for c in combos if c != reference]:
        emb = _unit(np.hstack([_unit(saved[n]["model"]) for n in combo.split("+")]))
        row = headline(retrieval_report(emb, labels, patients, sources, break_even=False))
        if combo != reference:
            diff = paired_difference(emb, _unit(ref["model"]), labels, patients, sources)
            row.update(delta_mAP=diff["all"], delta_finding=diff["nih_findings"])
        rows[combo] = row
        line = (f"{folder.name:16s} {combo:18s} mAP@10 {row['mAP@10']:.3f}  NIH {row['nih_mAP@10']:.3f}  per-finding "
                f"{row['finding_mAP@10']:.3f} (random {row['finding_random_mAP@10']:.3f})  same-source "
                f"{row['same_source_cross']:.3f}")
        if combo != reference:
            d, f = row["delta_mAP"], row["delta_finding"]
            line += (f"  vs {reference}: mAP@10 {d['delta_mAP@10']:+.3f} ({d['ci95'][0]:+.3f} .. {d['ci95'][1]:+.3f})"
                     f" per-finding {f['delta_mAP@10']:+.3f} ({f['ci95'][0]:+.3f} .. {f['ci95'][1]:+.3f})")
        print(line, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="benchmarks.model_card --out folders")
    parser.add_argument("--combos", default="default,two,default+two,base+two,base+default+two",
                        help="comma-separated runs or '+'-joined ensembles of runs")
    parser.add_argument("--reference", default="base")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    combos = args.combos.split(",")
    result = {str(folder): probe(folder, combos, args.reference) for folder in args.folders}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
