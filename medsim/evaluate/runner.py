"""`medsim evaluate`: every method over one labeled image set, scored with the metrics of
:mod:`medsim.evaluate.metrics`, written as results.json and a self-contained HTML report."""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsim.evaluate.calibrate import DEFINITION as LIST_DEFINITION
from medsim.evaluate.calibrate import patient_fold, relevance_text, validation_patients
from medsim.errors import MedsimError
from medsim.evaluate import metrics as M
from medsim.evaluate.data import EvalSet, load_eval_set
from medsim.evaluate.methods import (DEFAULT_METHODS, MethodOptions, MethodOutput, compute, default_cache_dir,
                                     expand_methods, resolve_cnn_bundle)

HEADLINE_K = 10
FOLD_SALT = "medsim-evaluate"

DEFINITIONS = {
    "pairwise": "Every valid query/gallery pair (the query itself and, by default, its own patient's images "
                "excluded) is predicted 'similar' when its similarity is >= the threshold. TP/FP/TN/FN count "
                "pairs. Accuracy = (TP+TN)/pairs, precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2PR/(P+R).",
    "break_even": "The threshold where pairwise precision equals pairwise recall (closest point of a sweep over "
                  "up to 2,048 thresholds); the method paper compares methods there. It is chosen on the evaluation "
                  "data itself, so it is an optimistic, oracle operating point.",
    "operating_point": "The calibrated threshold for the target list recall@k (below). Honest by construction: "
                       "patients are split in two folds by a hash of the patient id, the threshold for the queries "
                       "of one fold is calibrated on the queries of the other fold, and all figures at the "
                       "operating point are measured on queries the threshold was not fitted on.",
    "list_recall": LIST_DEFINITION + ".",
    "ranking": "Per query over its valid gallery images ranked by similarity (ties broken by a fixed "
               "pseudo-random order), averaged over the queries with at least one relevant gallery image: "
               "P@k = relevant in top k / k; R@k = relevant in top k / all relevant; mAP@k = mean over queries of "
               "AP@k = sum over ranks i<=k of P@i x rel_i / min(k, all relevant); nDCG@k = sum of rel_i/log2(i+1) "
               "over the top k, divided by the same sum for an ideal ranking.",
    "bootstrap": "95 % confidence intervals: percentile bootstrap over queries, resampling patients with "
                 "replacement (all of a patient's queries together); the gallery and the cross-fitted thresholds "
                 "are held fixed.",
    "per_finding": "Queries that have finding X; a gallery image is relevant when it has X. Base rate = share of "
                   "the valid gallery images that have X.",
    "nih_findings": "NIH per-finding mAP@10: the full-resolution NIH ChestX-ray14 images (sources nih, nih2, "
                    "nihtest; not rsna, whose patients cannot be linked to NIH ids, nor the 64 px nih64 copies) "
                    "query each other, own patient excluded; for each of the 14 NIH findings with at least 5 such "
                    "queries, mAP@10 of the queries that have it with relevant = the gallery image has it; macro = "
                    "mean over those findings; random = the exact expected mAP@10 of a random ranking of the same "
                    "galleries; lift = macro - random; 95 % patient-bootstrap intervals.",
    "same_source_cross": "Share of the top-10 results from the query's own source family (NIH ChestX-ray14 sources "
                         "nih, nih2, nih64, nihtest and rsna count as one), over the queries that have a relevant "
                         "image in another source family.",
    "per_source": "Queries from one source, relevance as in the headline; 'same source in top 10' = share of the "
                  "top-10 results that come from the query's own source (a high share with a low P@10 means the "
                  "method matches acquisition rather than findings).",
}


@dataclass
class EvaluationConfig:
    images: Path
    labels: Path
    out: Path
    methods: tuple[str, ...] = DEFAULT_METHODS
    relevance: str = "shares"
    include_same_patient: bool = False
    ks: tuple[int, ...] = M.DEFAULT_KS
    list_k: int = 10
    target_recall: float = 0.9
    bootstrap: int = 1000
    seed: int = 0
    limit: int | None = None
    sources: tuple[str, ...] | None = None
    model: str | None = None
    cache_dir: Path | None = None
    jobs: int = 1
    vocabulary_size: int = 1000
    n_features: int = 500
    image_size: int = 512
    examples: int = 8
    example_hits: int = 5
    min_finding_queries: int = 5
    use_validation_split: bool = True
    progress: bool = True
    command: str = ""
    extra_notes: list = field(default_factory=list)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] medsim evaluate: {message}", file=sys.stderr, flush=True)


def _ci(value, samples) -> dict:
    lo, hi = M.percentile_interval(samples)
    return {"value": _f(value), "ci95": [_f(lo), _f(hi)]}


def _f(x):
    x = float(x)
    return round(x, 6) if np.isfinite(x) else None


def _boot_mean(values, weights):
    values = np.asarray(values, dtype=np.float64)
    defined = np.isfinite(values)
    num = weights @ np.where(defined, values, 0.0)
    den = weights @ defined.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _break_even_rows(curves) -> dict:
    precision, recall = np.asarray(curves["precision"]), np.asarray(curves["recall"])
    gap = np.abs(precision - recall)
    gap = np.where(np.isfinite(gap) & (recall > 0), gap, np.inf)
    idx = gap.shape[1] - 1 - np.argmin(gap[:, ::-1], axis=1)
    rows = np.arange(len(idx))
    return {key: np.asarray(curves[key])[rows, idx] for key in ("accuracy", "precision", "recall", "f1")}


class Context:
    """Everything about the evaluation set that does not depend on the method."""

    def __init__(self, eval_set: EvalSet, config: EvaluationConfig):
        self.eval_set = eval_set
        self.config = config
        n = len(eval_set)
        ids = np.arange(n)
        self.patients = np.asarray([p or "" for p in eval_set.patients], dtype=object)
        self.labels = eval_set.labels
        self.sources = np.asarray(eval_set.sources, dtype=object)
        self.valid_all = ~M.exclusion_mask(ids, ids, eval_set.patients, eval_set.patients,
                                           config.include_same_patient)
        mode = config.relevance
        if mode.startswith("finding:"):
            finding = mode.split(":", 1)[1]
            self.queries = np.asarray([i for i, row in enumerate(self.labels) if finding in row], dtype=np.int64)
            if len(self.queries) == 0:
                raise MedsimError(f"no image has finding {finding!r}")
        else:
            self.queries = ids
        self.relevant = M.relevance_matrix([self.labels[i] for i in self.queries], self.labels, mode)
        self.valid = self.valid_all[self.queries]
        self.query_patients = self.patients[self.queries]
        self.fold = patient_fold(self.query_patients, 2, FOLD_SALT)
        self.weights = M.patient_bootstrap_weights(self.query_patients, config.bootstrap, config.seed) \
            if config.bootstrap > 0 else np.ones((1, len(self.queries)))
        self.label_matrix, self.vocabulary = M.label_matrix(self.labels)
        counts = self.label_matrix[self.queries].sum(axis=0)
        self.findings = [label for label, c in zip(self.vocabulary, counts) if c >= config.min_finding_queries]
        self.depth = max(max(config.ks), HEADLINE_K, config.list_k, config.example_hits)
        self.example_rows = self._pick_examples(config.examples)

    def _pick_examples(self, n: int) -> list[int]:
        """Query rows for the example grid: round-robin over sources, in a fixed hashed order, each with at least
        one relevant gallery image."""
        has = (self.relevant & self.valid).any(axis=1)
        order = sorted(range(len(self.queries)), key=lambda r: hashlib.sha256(
            f"example\0{self.eval_set.items[self.queries[r]].rel_path}".encode()).hexdigest())
        by_source: dict[str, list[int]] = {}
        for r in order:
            if has[r]:
                by_source.setdefault(self.sources[self.queries[r]], []).append(r)
        picked = []
        while len(picked) < n and any(by_source.values()):
            for source in sorted(by_source):
                if by_source[source] and len(picked) < n:
                    picked.append(by_source[source].pop(0))
        return picked

    def summary(self) -> dict:
        valid_pairs = int(self.valid.sum())
        relevant_pairs = int((self.relevant & self.valid).sum())
        es = self.eval_set
        sources, labels = {}, {}
        for item in es.items:
            sources[item.source or "-"] = sources.get(item.source or "-", 0) + 1
            for label in item.labels:
                labels[label] = labels.get(label, 0) + 1
        return {
            "data": {
                "images_dir": es.root, "labels_csv": es.labels_csv, "images": len(es),
                "patients": len({p for p in es.patients if p}), "sources": dict(sorted(sources.items())),
                "labels": dict(sorted(labels.items(), key=lambda kv: -kv[1])), "fingerprint": es.fingerprint(),
                "notes": list(es.notes),
            },
            "protocol": {
                "relevance": self.config.relevance, "relevance_text": relevance_text(self.config.relevance),
                "include_same_patient": self.config.include_same_patient,
                "queries": int(len(self.queries)), "gallery": int(len(es)),
                "queries_with_relevant": int((self.relevant & self.valid).any(axis=1).sum()),
                "valid_pairs": valid_pairs, "relevant_pairs": relevant_pairs,
                "pairwise_base_rate": _f(relevant_pairs / valid_pairs) if valid_pairs else None,
                "ks": list(self.config.ks), "list_k": self.config.list_k, "target_recall": self.config.target_recall,
                "bootstrap_resamples": self.config.bootstrap, "seed": self.config.seed,
                "fold_sizes": [int((self.fold == f).sum()) for f in (0, 1)],
                "definitions": DEFINITIONS,
            },
        }


def score_method(scores: np.ndarray, ctx: Context) -> dict:
    """All metrics of one similarity matrix."""
    cfg = ctx.config
    S = np.asarray(scores)[ctx.queries]
    R, V, W = ctx.relevant, ctx.valid, ctx.weights
    out: dict = {}

    # Pairwise sweep and break-even point.
    sweep = M.sweep_counts(S, R, V)
    curve = sweep.curve()
    be = M.break_even(curve)
    be_boot = _break_even_rows(sweep.curves(W))
    out["break_even"] = {key: _ci(be[key], be_boot[key]) for key in ("accuracy", "precision", "recall", "f1")}
    out["break_even"]["threshold"] = _f(be["threshold"])
    out["pairwise_average_precision"] = _f(M.average_precision_pairwise(curve))

    # Ranking.
    top = M.rank_topk(S, V, ctx.depth, seed=cfg.seed)
    ks = tuple(sorted(set(cfg.ks) | {HEADLINE_K}))  # the breakdowns and the summary line use k = 10
    ranking = M.ranking_metrics(top, R, V, ks)
    out["ranking"] = {}
    for k in ks:
        for name in ("P", "R", "mAP", "nDCG"):
            key = f"{name}@{k}"
            out["ranking"][key] = _ci(M.mean_over_queries(ranking[key]), _boot_mean(ranking[key], W))
    hits = np.take_along_axis(R, top.indices, axis=1) & top.filled
    has = ranking["has_relevant"]
    cum = np.cumsum(hits, axis=1)
    depth = hits.shape[1]
    out["p_at_k_curve"] = [_f(v) for v in (cum[has] / np.arange(1, depth + 1)).mean(axis=0)] if has.any() else []

    # Operating point: list recall@k, thresholds cross-fitted across the two patient folds.
    lk = cfg.list_k
    top_s, top_r = top.scores[:, :lk], hits[:, :lk]
    thresholds = np.zeros(len(S))
    fold_thresholds = {}
    for f in (0, 1):
        fit = ctx.fold != f
        if not fit.any() or not top_r[fit].any():
            fit = np.ones(len(S), dtype=bool)  # a fold too small to fit on: fall back to all queries
        t = M.list_threshold_for_recall(top_s[fit], top_r[fit], cfg.target_recall)
        thresholds[ctx.fold == f] = t
        fold_thresholds[f"fold{f}"] = _f(t)
    list_counts = M.list_counts_at(top_s, top_r, thresholds)
    list_point = M.list_metrics(list_counts)
    pair_counts = M.pair_counts_at(S, R, V, thresholds)
    pair_point = M.binary_metrics(*(float(pair_counts[key].sum()) for key in ("tp", "fp", "tn", "fn")))
    boot_pair = M.binary_metrics(*(W @ pair_counts[key] for key in ("tp", "fp", "tn", "fn")))
    boot_list = {
        "list_recall": (W @ list_counts["relevant_kept"]) / np.maximum(W @ list_counts["relevant_in_list"], 1e-12),
        "list_precision": (W @ list_counts["relevant_kept"]) / np.maximum(W @ list_counts["kept"], 1e-12),
        "empty_rate": (W @ (list_counts["kept"] == 0)) / W.sum(axis=1),
    }
    op = {key: _ci(pair_point[key], boot_pair[key]) for key in ("accuracy", "precision", "recall", "f1")}
    for key in ("list_recall", "list_precision", "empty_rate"):
        op[key] = _ci(list_point[key], boot_list[key])
    op.update({
        "kept_per_query": _f(list_point["kept_per_query"]),
        "any_relevant_kept_rate": _f(list_point["any_relevant_kept_rate"]),
        "dropped_irrelevant_share": _f(list_point["dropped_irrelevant_share"]),
        f"precision_at_{lk}_without_threshold": _f(M.list_metrics(M.list_counts_at(top_s, top_r, -np.inf))
                                                   ["list_precision"]),
        "thresholds": fold_thresholds,
        "threshold_all_queries": _f(M.list_threshold_for_recall(top_s, top_r, cfg.target_recall)),
        "target_recall": cfg.target_recall, "k": lk,
    })
    out["operating_point"] = op

    # Curves for the plots (pairwise PR, downsampled; list recall vs precision).
    t = len(curve["thresholds"])
    keep = np.unique(np.concatenate([np.linspace(0, t - 1, min(t, 400)).round().astype(int),
                                     [M.break_even_index(curve["precision"], curve["recall"])]]))
    out["pr_curve"] = {key: [_f(v) for v in np.asarray(curve[key])[keep]]
                       for key in ("thresholds", "precision", "recall")}
    lc = M.list_curve(top_s, top_r)
    out["list_curve"] = {key: [_f(v) for v in values] for key, values in lc.items()}

    # Per finding.
    per_finding = {}
    for finding in ctx.findings:
        column = ctx.vocabulary.index(finding)
        has_x = ctx.label_matrix[:, column]
        rows = np.flatnonzero(has_x[ctx.queries])
        if len(rows) == 0:
            continue
        sub = M.TopK(top.indices[rows], top.scores[rows], top.filled[rows])
        rel_x = np.broadcast_to(has_x[None, :], (len(rows), len(has_x)))
        rx = M.ranking_metrics(sub, rel_x, V[rows], (HEADLINE_K,))
        Wr = W[:, rows]
        base = ((rel_x & V[rows]).sum(axis=1) / np.maximum(V[rows].sum(axis=1), 1)).mean()
        per_finding[finding] = {
            "queries": int(len(rows)), "base_rate": _f(base),
            f"P@{HEADLINE_K}": _ci(M.mean_over_queries(rx[f"P@{HEADLINE_K}"]), _boot_mean(rx[f"P@{HEADLINE_K}"], Wr)),
            f"R@{HEADLINE_K}": _f(M.mean_over_queries(rx[f"R@{HEADLINE_K}"])),
            f"mAP@{HEADLINE_K}": _ci(M.mean_over_queries(rx[f"mAP@{HEADLINE_K}"]),
                                     _boot_mean(rx[f"mAP@{HEADLINE_K}"], Wr)),
        }
    out["per_finding"] = per_finding

    # The product's promise, per finding: NIH images among themselves (full-resolution NIH ChestX-ray14 with NIH
    # patient ids; RSNA and the 64 px copies left out), per NIH finding with enough queries, and a random ranking.
    nf = M.nih_finding_ap(scores, list(ctx.labels), list(ctx.patients), list(ctx.sources), k=HEADLINE_K,
                          min_queries=cfg.min_finding_queries, n_resamples=max(cfg.bootstrap, 1), seed=cfg.seed)
    if nf is not None:
        fs = M.finding_summary(nf[0], nf[1] if cfg.bootstrap > 0 else None)
        out["nih_findings"] = {
            "macro": _f(fs["macro"]), "macro_ci95": [_f(v) for v in fs.get("macro_ci95", [np.nan, np.nan])],
            "random_macro": _f(fs["random_macro"]), "lift": _f(fs["lift"]),
            "lift_ci95": [_f(v) for v in fs.get("lift_ci95", [np.nan, np.nan])],
            "findings": {name: {"queries": row["queries"], f"mAP@{HEADLINE_K}": _f(row[f"mAP@{HEADLINE_K}"]),
                                "random": _f(row["random"])} for name, row in fs["findings"].items()},
            "sources": list(M.NIH_FINDING_SOURCES), "min_queries": cfg.min_finding_queries,
        }
    cross = M.same_source_share(top, R, V, list(ctx.sources), k=HEADLINE_K,
                                query_sources=list(ctx.sources[ctx.queries]))
    out["same_source_cross"] = {"share": _f(cross["share"]), "queries": cross["queries"]}

    # Per source.
    per_source = {}
    query_sources = ctx.sources[ctx.queries]
    top_sources = ctx.sources[top.indices[:, :HEADLINE_K]]
    same_source = (top_sources == query_sources[:, None]) & top.filled[:, :HEADLINE_K]
    for source in sorted(set(query_sources)):
        rows = query_sources == source
        indicator = rows.astype(np.float64)
        source_curve = sweep.curve(indicator)
        source_be = M.break_even(source_curve)
        per_source[source or "-"] = {
            "queries": int(rows.sum()),
            f"P@{HEADLINE_K}": _f(M.mean_over_queries(ranking[f"P@{HEADLINE_K}"][rows])),
            f"mAP@{HEADLINE_K}": _f(M.mean_over_queries(ranking[f"mAP@{HEADLINE_K}"][rows])),
            f"nDCG@{HEADLINE_K}": _f(M.mean_over_queries(ranking[f"nDCG@{HEADLINE_K}"][rows])),
            "break_even_f1": _f(source_be["f1"]),
            f"same_source_in_top{HEADLINE_K}": _f(same_source[rows].sum()
                                                  / max(top.filled[rows, :HEADLINE_K].sum(), 1)),
            "pairwise_base_rate": _f((R[rows] & V[rows]).sum() / max(V[rows].sum(), 1)),
        }
    out["per_source"] = per_source

    # Examples.
    examples = []
    for r in ctx.example_rows:
        row_hits = []
        for j in range(min(cfg.example_hits, top.indices.shape[1])):
            if not top.filled[r, j]:
                break
            g = int(top.indices[r, j])
            row_hits.append({"item": g, "score": _f(top.scores[r, j]), "relevant": bool(R[r, g]),
                             "above_threshold": bool(top.scores[r, j] >= thresholds[r])})
        examples.append({"query": int(ctx.queries[r]), "hits": row_hits})
    out["examples"] = examples
    return out


def run_evaluation(config: EvaluationConfig) -> dict:
    """Evaluate every method and write ``results.json`` and ``index.html`` under ``config.out``."""
    from medsim.evaluate.report import write_json, write_report

    started = time.perf_counter()
    notes = list(config.extra_notes)
    specs, method_notes = expand_methods(config.methods, config.model)
    notes += method_notes
    if not specs:
        raise MedsimError("no methods to evaluate")
    _say(f"loading labels and images list from {config.images}")
    eval_set = load_eval_set(config.images, config.labels, sources=config.sources, limit=config.limit)

    bundles = {}
    for spec in specs:
        if spec.family == "cnn":
            try:
                bundles[spec.key] = resolve_cnn_bundle(spec)
            except Exception as exc:  # reported as an unavailable row
                bundles[spec.key] = exc
    if config.use_validation_split:
        for key, bundle in bundles.items():
            patients = None if isinstance(bundle, Exception) else validation_patients(bundle)
            if patients:
                eval_set = eval_set.only_patients(
                    patients, f"evaluated only on the validation patients recorded in model bundle "
                              f"{bundle.name} ({bundle.fingerprint}), for every method")
                break
    if len(eval_set) < 3:
        raise MedsimError(f"only {len(eval_set)} labeled image(s) to evaluate")
    _say(f"{len(eval_set)} images, {len({p for p in eval_set.patients if p})} patients; methods: "
         f"{', '.join(s.key for s in specs)}")
    ctx = Context(eval_set, config)
    options = MethodOptions(cache_dir=Path(config.cache_dir or default_cache_dir()), jobs=max(1, config.jobs),
                            vocabulary_size=config.vocabulary_size, n_features=config.n_features,
                            image_size=config.image_size, progress=config.progress)
    options.cache_dir.mkdir(parents=True, exist_ok=True)
    results = {"medsim_evaluate_version": 1, "created_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "command": config.command, **ctx.summary(), "methods": [], "notes": notes}
    results["data"]["items"] = [{"path": it.rel_path, "labels": list(it.labels), "patient_id": it.patient_id,
                                 "source": it.source} for it in eval_set.items]
    outputs: list[MethodOutput] = []
    for n, spec in enumerate(specs, 1):
        _say(f"[{n}/{len(specs)}] {spec.title}: features and similarities")
        bundle = bundles.get(spec.key)
        if isinstance(bundle, Exception):
            output = MethodOutput(spec, unavailable=f"model bundle unavailable: {bundle}")
        else:
            output = compute(spec, eval_set, options, bundle=bundle)
        outputs.append(output)
        row = {"key": spec.key, "title": spec.title, "family": spec.family, "note": spec.note,
               "available": output.scores is not None, "unavailable_reason": output.unavailable,
               "seconds_features": round(output.seconds, 1), "cached": output.cached, "info": output.info}
        if output.scores is not None:
            t0 = time.perf_counter()
            row.update(score_method(output.scores, ctx))
            row["seconds_metrics"] = round(time.perf_counter() - t0, 1)
            op, be = row["operating_point"], row["break_even"]
            _say(f"    {spec.key}: mAP@10 {row['ranking']['mAP@10']['value']:.3f}, P@10 "
                 f"{row['ranking']['P@10']['value']:.3f}, break-even F1 {be['f1']['value']:.3f}, operating point "
                 f"list recall {op['list_recall']['value']:.3f} / list precision {op['list_precision']['value']:.3f}"
                 f" ({output.seconds:.0f} s features{', cached' if output.cached else ''})")
        results["methods"].append(row)
        output.scores = None  # free the N x N matrix
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    config.out.mkdir(parents=True, exist_ok=True)
    _say(f"writing the report to {config.out}")
    write_report(results, config.out, images_root=Path(eval_set.root))
    results["wall_seconds_with_report"] = round(time.perf_counter() - started, 1)
    write_json(results, config.out)
    _say(f"done in {results['wall_seconds_with_report']:.0f} s: {config.out / 'index.html'}")
    return results
