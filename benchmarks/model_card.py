"""Every training number of docs/model-card.md from one command (issue 18).

    python -m benchmarks.model_card --images ../shared/data/cxr --out var/model-card            # CPU, sequential
    python -m benchmarks.model_card --images DIR --out OUT --device cuda --parallel 6            # on a GPU machine
    python -m benchmarks.model_card --from-reports OUT                                           # tables only

Runs `medsim train` once per experiment of :data:`EXPERIMENTS` (same data, split and seed; the first run fills the
activation cache the others reuse), keeps each run's report (``OUT/NAME.json``) and validation embeddings, and
writes ``OUT/model-card.md``: the ImageNet baseline and every run with whole-split mAP@10, NIH mAP@10, NIH
per-finding macro mAP@10 with its 95 % patient-bootstrap interval, the random-ranking figure, the lift, the
same-source share of the top 10, break-even precision and times; and, where the embeddings are there, each run's
paired difference to the current recipe ("base") with 95 % patient-bootstrap intervals.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# name -> (what it is, medsim train arguments). "base" is the recipe before issue 18 (the comparison point);
# "default" is today's `medsim train` default.
LEGACY = ["--rarity", "0", "--cross-source", "1"]
# The second stage of the two-stage recipe (`make model`): the images that carry the full NIH finding vocabulary.
REFINE = ["--train-on", "source=nih", "--train-on", "source=nih2", "--train-on", "source=nih64", "--train-on",
          "source=nihtest", "--epochs", "6", "--lr", "5e-5", "--head-lr", "5e-4", "--select", "last"]
EXPERIMENTS = {
    "base": ("recipe before issue 18: conv5_3 + head, bce+supcon", LEGACY),
    "r05": ("+ rarity weights (freq^-0.5) in bce and supcon", ["--rarity", "0.5", "--cross-source", "1"]),
    "r1": ("+ rarity weights (freq^-1)", ["--rarity", "1", "--cross-source", "1"]),
    "x2": ("cross-source positives x2", ["--rarity", "0", "--cross-source", "2"]),
    "r05x2": ("rarity 0.5 + cross-source x2", ["--rarity", "0.5", "--cross-source", "2"]),
    "r1x2": ("rarity 1 + cross-source x2", ["--rarity", "1", "--cross-source", "2"]),
    "default": ("rarity 0.5 + cross-source x4 (the default)", []),
    "x8": ("rarity 0.5 + cross-source x8: the trend from x1 to x4 carried on", ["--cross-source", "8"]),
    "t05": ("default at supcon temperature 0.05 (0.1): sharper contrast between a query's nearest positives and "
            "negatives", ["--temperature", "0.05"]),
    "t03": ("default at supcon temperature 0.03", ["--temperature", "0.03"]),
    "t05x8": ("supcon temperature 0.05 + cross-source x8", ["--temperature", "0.05", "--cross-source", "8"]),
    "gem": ("default + GeM pooling (p = 3): a strong local response weighs more than in the average",
            ["--pooling", "gem"]),
    "e20": ("default, up to 20 epochs (patience 4)", ["--epochs", "20"]),
    "nonn": ("default, without training on RSNA's catch-all label (Not Normal (no lung opacity): 474 training "
             "images whose findings differ)", ["--leave-out", "label=Not Normal (no lung opacity)"]),
    "s336": ("default at a 336 px input (--image-size 336): small findings 1.5x larger in the trainable maps; "
             "2.25x the cost of the cache, training and every embedding", ["--image-size", "336"]),
    "old": ("default, trained only on the sources of the 2,391-image folder (no nih2, no rsna): does the grown "
            "folder help?", ["--leave-out", "source=nih2", "--leave-out", "source=rsna"]),
    "two": ("default, then a second stage (`--init` the default's bundle): 6 more epochs at half the learning rates "
            "on the images with the full NIH finding vocabulary only (nih, nih2, nih64, nihtest), keeping the last "
            "epoch (no selection: the whole-split and NIH figures can peak at its first epoch, before the "
            "per-finding figure rises); train/wall s: that stage",
            ["--init", "@default", *REFINE]),
    "twonih": ("`two` as first adopted (session 8): its best epoch by NIH mAP@10",
               ["--init", "@default", *REFINE, "--select", "nih"]),
    "two52": ("`two`, its second stage training conv5_2 as well (1,284 images: the extra layer is cheap there)",
              ["--init", "@default", *REFINE, "--train-layers", "conv5_2"]),
    "r05sb": ("rarity 0.5 + source-balanced batches (0.5)", ["--rarity", "0.5", "--cross-source", "1",
                                                             "--source-balance", "0.5"]),
    "r05adv": ("rarity 0.5 + adversarial source head (0.1)", ["--rarity", "0.5", "--cross-source", "1",
                                                              "--objective", "bce+supcon+0.1*adv"]),
    "c52base": ("conv5_2 + conv5_3 + head, recipe before issue 18", ["--train-layers", "conv5_2", *LEGACY]),
    "c52r05": ("conv5_2 + conv5_3, rarity 0.5", ["--train-layers", "conv5_2", "--rarity", "0.5",
                                                 "--cross-source", "1"]),
    "c52r05x2": ("conv5_2 + conv5_3, rarity 0.5 + cross-source x2", ["--train-layers", "conv5_2", "--rarity",
                                                                     "0.5", "--cross-source", "2"]),
    "c52r05x2sb": ("conv5_2 + conv5_3, rarity 0.5 + cross-source x2 + source-balanced 0.5",
                   ["--train-layers", "conv5_2", "--rarity", "0.5", "--cross-source", "2", "--source-balance", "0.5"]),
}
GPU_EXPERIMENTS = {
    "allbase": ("whole VGG-16 on images (GPU), recipe before issue 18", ["--train-layers", "all", "--workers", "6",
                                                                         *LEGACY]),
    "alldefault": ("whole VGG-16 on images (GPU), default objective", ["--train-layers", "all", "--workers", "6"]),
}
TRAIN = ("import argparse, sys\nfrom medsim.train import cli\np = argparse.ArgumentParser(); cli.add_arguments(p); "
         "sys.exit(cli.command(p.parse_args(sys.argv[1:])))")


def run_one(name: str, args: list[str], opts) -> tuple[str, int, float]:
    out = Path(opts.out)
    args = [str(out / "bundles" / a[1:]) if a.startswith("@") else a for a in args]  # "@NAME": run NAME's bundle
    log = out / f"{name}.log"
    cmd = [sys.executable, "-c", TRAIN, "--images", str(opts.images), "--labels", str(opts.labels or
           Path(opts.images) / "labels.csv"), "--seed", str(opts.seed), "--device", opts.device, "--no-progress",
           "--no-int8-check", "--out", str(out / "bundles" / name), "--work-dir", str(out / "runs" / name),
           "--restart", "--overwrite", "--report", str(out / f"{name}.json"), *args]
    if opts.threads:
        cmd += ["--threads", str(opts.threads)]
    cmd += opts.train_args.split() if opts.train_args else []
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    return name, code, time.perf_counter() - t0


def _f(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(ci):
    return "-" if not ci or None in ci else f"{ci[0]:.3f} .. {ci[1]:.3f}"


def paired(out: Path, names: list[str], reference: str = "base") -> dict:
    """Paired differences (run - reference) on the validation split, from the saved validation embeddings."""
    import numpy as np

    from medsim.train.validation import paired_difference

    ref_file = out / "runs" / reference / "validation_embeddings.npz"
    if not ref_file.is_file():
        return {}
    ref = np.load(ref_file)
    labels = [tuple(x.split("|")) if x else () for x in ref["labels"]]
    out_d = {}
    for name in names:
        f = out / "runs" / name / "validation_embeddings.npz"
        if name == reference or not f.is_file():
            continue
        e = np.load(f)
        if list(e["paths"]) != list(ref["paths"]):
            continue
        out_d[name] = paired_difference(e["model"], ref["model"], labels, list(ref["patients"]),
                                        list(ref["sources"]))
    return out_d


def tables(out: Path) -> str:
    reports = {}
    for name in list(EXPERIMENTS) + list(GPU_EXPERIMENTS) + sorted(p.stem for p in out.glob("*.json")):
        f = out / f"{name}.json"
        if f.is_file() and name not in reports:
            reports[name] = json.loads(f.read_text())
    if not reports:
        return "no reports under " + str(out)
    lines = [("| run | what | best epoch | mAP@10 | NIH mAP@10 | NIH per-finding macro mAP@10 (95 % CI) | random | "
              "lift | same-source share | break-even P | train s | wall s |"),
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    first = next(iter(reports.values()))
    b = first["baseline"]
    nb = b.get("nih_findings", {})
    lines.append(f"| ImageNet | VGG-16 GAP, no training | - | {_f(b.get('mAP@10'))} | "
                 f"{_f(b['by_source'].get('nih', {}).get('mAP@10'))} | {_f(nb.get('macro'))} "
                 f"({_ci(nb.get('macro_ci95'))}) | {_f(nb.get('random_macro'))} | {_f(nb.get('lift'))} | "
                 f"{_f(b.get('same_source_at_10_cross'))} | {_f(b.get('break_even', {}).get('precision'))} | - | - |")
    for name, r in reports.items():
        v = r["validation"]
        nf = v.get("nih_findings", {})
        what = (EXPERIMENTS.get(name) or GPU_EXPERIMENTS.get(name) or ("", []))[0]
        lines.append(f"| {name} | {what} | {r['best_epoch']} | {_f(v.get('mAP@10'))} | "
                     f"{_f(v['by_source'].get('nih', {}).get('mAP@10'))} | {_f(nf.get('macro'))} "
                     f"({_ci(nf.get('macro_ci95'))}) | {_f(nf.get('random_macro'))} | {_f(nf.get('lift'))} | "
                     f"{_f(v.get('same_source_at_10_cross'))} | {_f(v.get('break_even', {}).get('precision'))} | "
                     f"{_f(r.get('timings', {}).get('train_seconds'), 0)} | {_f(r.get('wall_seconds'), 0)} |")
    # against the recipe before issue 18 (the goals), and against today's default (what each change to it does)
    for reference in ("base", "default"):
        diffs = paired(out, list(reports), reference)
        if not diffs:
            continue
        lines += ["", f"Paired differences to `{reference}` (95 % patient-bootstrap intervals):", "",
                  "| run | mAP@10 | NIH mAP@10 | NIH per-finding macro mAP@10 |", "|---|---|---|---|"]
        for name, d in diffs.items():
            cells = []
            for key in ("all", "nih", "nih_findings"):
                x = d.get(key)
                cells.append("-" if not x else f"{x['delta_mAP@10']:+.3f} ({_ci(x['ci95'])})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first_nf = first["validation"].get("nih_findings", {}).get("findings", {})
    if first_nf:
        lines += ["", "Per NIH finding (validation queries; mAP@10 of each run; random ranking):", ""]
        names = list(reports)
        lines.append("| finding | queries | random | " + " | ".join(names) + " |")
        lines.append("|---|---:|---:|" + "---:|" * len(names))
        for finding, row in first_nf.items():
            cells = [_f(reports[n]["validation"].get("nih_findings", {}).get("findings", {}).get(finding, {})
                        .get("mAP@10")) for n in names]
            lines.append(f"| {finding} | {row['queries']} | {_f(row['random'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=Path("../shared/data/cxr"))
    p.add_argument("--labels", type=Path)
    p.add_argument("--out", type=Path, default=Path("var/model-card"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--parallel", type=int, default=1, help="runs at a time after the first (GPU machines)")
    p.add_argument("--only", help="comma-separated experiment names")
    p.add_argument("--train-args", help="more `medsim train` arguments for every run (smoke tests: '--epochs 1 "
                   "--max-steps-per-epoch 1')")
    p.add_argument("--gpu", action="store_true", help="also the whole-network experiments (needs --device cuda)")
    p.add_argument("--from-reports", type=Path, help="only write the tables from the reports in this folder")
    opts = p.parse_args(argv)
    if opts.from_reports:
        text = tables(opts.from_reports)
        (opts.from_reports / "model-card.md").write_text(text)
        print(text)
        return 0
    opts.out.mkdir(parents=True, exist_ok=True)
    todo = dict(EXPERIMENTS)
    if opts.gpu:
        todo.update(GPU_EXPERIMENTS)
    if opts.only:
        todo = {k: v for k, v in todo.items() if k in opts.only.split(",")}
    # runs that start from another run's bundle ("@NAME") go after the others
    second = [n for n, (_, args) in todo.items() if any(a.startswith("@") for a in args)]
    names = [n for n in todo if n not in second]
    results = []
    if names:
        results.append(run_one(names[0], todo[names[0]][1], opts))  # fills the activation cache
    for batch in (names[1:], second):
        with ThreadPoolExecutor(max(1, opts.parallel)) as pool:
            results += list(pool.map(lambda n: run_one(n, todo[n][1], opts), batch))
    for name, code, seconds in results:
        print(f"{name}: exit {code}, {seconds:.0f} s", file=sys.stderr)
    text = tables(opts.out)
    (opts.out / "model-card.md").write_text(text)
    print(text)
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
