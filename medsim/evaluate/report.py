"""The evaluation report: ``results.json`` (every number), ``plots/*.png`` and ``index.html``, a single file with the
plots and thumbnails embedded, so it opens without internet and can be moved on its own; it is rendered from the
Jinja2 template ``medsim/templates/evaluation.html.j2``.

Thumbnails of the images appear only in the HTML under the report folder (git-ignored ``reports/``), never in docs.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import numpy as np

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
          "#bcbd22"]


def write_json(results: dict, out: Path) -> Path:
    path = Path(out) / "results.json"
    path.write_text(json.dumps(results, indent=1, allow_nan=False, default=_jsonable))
    return path


def _jsonable(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def write_report(results: dict, out: Path, images_root: Path | None = None, thumbnails: bool = True) -> Path:
    out = Path(out)
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = make_plots(results, plots_dir)
    write_json(results, out)
    (out / "summary.md").write_text(markdown_summary(results), encoding="utf-8")
    page = render_html(results, plots, images_root if thumbnails else None)
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


# ---- plots -----------------------------------------------------------------------------------------------------


def _available(results):
    return [m for m in results["methods"] if m.get("available")]


def _v(entry):
    if isinstance(entry, dict):
        return entry.get("value")
    return entry


def make_plots(results: dict, plots_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    methods = _available(results)
    protocol = results["protocol"]
    plots: dict[str, Path] = {}
    if not methods:
        return plots

    def save(fig, name):
        path = plots_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        plots[name] = path

    # Pairwise PR curves with the break-even and operating points.
    fig, ax = plt.subplots(figsize=(7, 5.2))
    for color, m in zip(COLORS, methods):
        pr = m["pr_curve"]
        recall = np.asarray([np.nan if v is None else v for v in pr["recall"]], dtype=float)
        precision = np.asarray([np.nan if v is None else v for v in pr["precision"]], dtype=float)
        ax.plot(recall, precision, color=color, lw=1.6, label=m["title"])
        be = m["break_even"]
        ax.plot(_v(be["recall"]), _v(be["precision"]), "o", color=color, ms=6, mfc="white")
        op = m["operating_point"]
        ax.plot(_v(op["recall"]), _v(op["precision"]), "*", color=color, ms=12, mec="black", mew=0.5)
    base = protocol.get("pairwise_base_rate")
    if base is not None:
        ax.axhline(base, color="gray", ls="--", lw=1, label=f"base rate {base:.2f}")
    ax.plot([0, 1], [0, 1], color="lightgray", lw=0.8, ls=":")
    ax.set_xlabel("pairwise recall")
    ax.set_ylabel("pairwise precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.set_title("Pairwise precision-recall (o break-even, * calibrated operating point)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    save(fig, "pr_curves")

    # List recall vs list precision (the user-facing curve) with the operating point.
    fig, ax = plt.subplots(figsize=(7, 5.2))
    k = protocol["list_k"]
    for color, m in zip(COLORS, methods):
        lc = m["list_curve"]
        ax.plot(lc["list_recall"], lc["list_precision"], color=color, lw=1.6, label=m["title"])
        op = m["operating_point"]
        ax.plot(_v(op["list_recall"]), _v(op["list_precision"]), "*", color=color, ms=12, mec="black", mew=0.5)
    ax.axvline(protocol["target_recall"], color="gray", ls="--", lw=1, label=f"target {protocol['target_recall']}")
    ax.set_xlabel(f"list recall@{k} (relevant top-{k} results kept above the threshold)")
    ax.set_ylabel("list precision (kept results that are relevant)")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.set_title(f"Thresholding the top-{k} list (* calibrated operating point, cross-fitted)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    save(fig, "list_curves")

    # P@k.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, m in zip(COLORS, methods):
        curve = [np.nan if v is None else v for v in m["p_at_k_curve"]]
        ax.plot(np.arange(1, len(curve) + 1), curve, color=color, lw=1.6, label=m["title"])
    if base is not None:
        ax.axhline(base, color="gray", ls="--", lw=1, label="base rate (random ranking)")
    ax.set_xlabel("k")
    ax.set_ylabel("mean P@k")
    ax.set_ylim(0, 1.0)
    ax.set_title("Precision at k (mean over queries)", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, "p_at_k")

    # Per finding bars (mAP@10 with CI) and per source bars (P@10).
    findings = sorted({f for m in methods for f in m.get("per_finding", {})},
                      key=lambda f: -max(m["per_finding"].get(f, {}).get("queries", 0) for m in methods))
    if findings:
        fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(findings) + 2), 4.8))
        width = 0.8 / len(methods)
        x = np.arange(len(findings))
        for i, (color, m) in enumerate(zip(COLORS, methods)):
            vals, lo, hi = [], [], []
            for f in findings:
                entry = m["per_finding"].get(f, {}).get("P@10") or {"value": None, "ci95": [None, None]}
                value = np.nan if entry["value"] is None else entry["value"]
                vals.append(value)
                lo.append(0 if entry["ci95"][0] is None else max(value - entry["ci95"][0], 0))
                hi.append(0 if entry["ci95"][1] is None else max(entry["ci95"][1] - value, 0))
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, color=color, label=m["title"],
                   yerr=[lo, hi], capsize=2, error_kw={"lw": 0.7})
        bases = [methods[0]["per_finding"].get(f, {}).get("base_rate") for f in findings]
        ax.scatter(x, [np.nan if b is None else b for b in bases], marker="_", s=400, color="black",
                   label="base rate", zorder=5)
        labels = [f"{f}\n(n={methods[0]['per_finding'].get(f, {}).get('queries', 0)})" for f in findings]
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("P@10 (relevant = has the finding)")
        ax.set_ylim(0, 1.0)
        ax.set_title("Per finding: P@10 with 95 % CI; black bar = share of gallery with the finding", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        save(fig, "per_finding")

    sources = sorted({s for m in methods for s in m.get("per_source", {})})
    if len(sources) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.3 * len(sources) + 4), 4.6))
        width = 0.8 / len(methods)
        x = np.arange(len(sources))
        for i, (color, m) in enumerate(zip(COLORS, methods)):
            offset = (i - (len(methods) - 1) / 2) * width
            p10 = [m["per_source"].get(s, {}).get("P@10") for s in sources]
            same = [m["per_source"].get(s, {}).get("same_source_in_top10") for s in sources]
            axes[0].bar(x + offset, [np.nan if v is None else v for v in p10], width, color=color, label=m["title"])
            axes[1].bar(x + offset, [np.nan if v is None else v for v in same], width, color=color)
        ticks = [f"{s}\n(n={methods[0]['per_source'].get(s, {}).get('queries', 0)})" for s in sources]
        for axis, title in zip(axes, ("P@10 by query source", "share of top-10 from the query's own source")):
            axis.set_xticks(x, ticks, rotation=45, ha="right", fontsize=8)
            axis.set_ylim(0, 1.0)
            axis.set_title(title, fontsize=10)
        axes[0].legend(fontsize=7)
        save(fig, "per_source")
    return plots


# ---- HTML --------------------------------------------------------------------------------------------------------

def _fmt(entry, digits=3, pct=False):
    value = _v(entry)
    if value is None:
        return "–"
    text = f"{100 * value:.1f}" if pct else f"{value:.{digits}f}"
    if isinstance(entry, dict) and entry.get("ci95") and None not in entry["ci95"]:
        lo, hi = entry["ci95"]
        ci = f"{100 * lo:.1f}–{100 * hi:.1f}" if pct else f"{lo:.{digits}f}–{hi:.{digits}f}"
        return f"{text} <span class='ci'>[{ci}]</span>"
    return text


def _thumbnail(path: str, size: int = 112) -> str | None:
    try:
        from PIL import Image

        from medsim.ingest import read_any

        pixels = read_any(path).pixels
        image = Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8))
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    except Exception:
        return None


def _method_detail(m: dict) -> str:
    """The details cell of an evaluated method (plain text; the template escapes it): its note, then its info."""
    info = dict(m.get("info") or {})
    detail = "; ".join(f"{key}: {json.dumps(value) if isinstance(value, dict) else value}"
                       for key, value in info.items())
    if m.get("note"):
        detail = m["note"] + ("; " + detail if detail else "")
    return detail


def render_html(results: dict, plots: dict[str, Path], images_root: Path | None) -> str:
    """index.html, rendered from the template ``medsim/templates/evaluation.html.j2`` (autoescaped)."""
    from markupsafe import Markup

    from medsim.templates import get_template

    data, protocol, methods = results["data"], results["protocol"], results["methods"]
    available = _available(results)
    items = data.get("items")
    thumbs: dict[int, str | None] = {}

    def thumb(i: int) -> str:
        if i not in thumbs:
            thumbs[i] = _thumbnail(str(Path(images_root) / items[i]["path"]))
        return thumbs[i] or ""

    findings = sorted({f for m in available for f in m.get("per_finding", {})})
    sources = sorted({s for m in available for s in m.get("per_source", {})})
    return get_template("evaluation.html.j2").render(
        results=results, data=data, protocol=protocol, methods=methods, available=available,
        k=protocol["list_k"], target=protocol["target_recall"],
        plots={name: base64.b64encode(Path(path).read_bytes()).decode() for name, path in plots.items()},
        finding_rows=[(f, next(m["per_finding"][f] for m in available if f in m["per_finding"])) for f in findings],
        source_rows=[(s, next(m["per_source"][s] for m in available if s in m["per_source"])) for s in sources],
        examples=bool(images_root is not None and available and available[0].get("examples")), items=items,
        fmt=lambda entry, digits=3, pct=False: Markup(_fmt(entry, digits, pct)),  # numbers and a <span>: safe
        thumb=thumb, method_detail=_method_detail)


# ---- Markdown summary (for docs/evaluation.md) -------------------------------------------------------------------


def _md(entry, digits=3):
    value = _v(entry)
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    if isinstance(entry, dict) and entry.get("ci95") and None not in entry["ci95"]:
        lo, hi = entry["ci95"]
        text += f" ({lo:.{digits}f}–{hi:.{digits}f})"
    return text


def markdown_summary(results: dict) -> str:
    """The headline tables as Markdown (what docs/evaluation.md shows), with 95 % CIs in parentheses."""
    protocol = results["protocol"]
    k = protocol["list_k"]
    available = _available(results)
    lines = [
        f"{results['data']['images']} images, {results['data']['patients']} patients; relevance: "
        f"{protocol['relevance_text']}; pairwise base rate {protocol['pairwise_base_rate']:.3f}; "
        f"{protocol['bootstrap_resamples']} patient-bootstrap resamples.",
        "",
        f"At the calibrated operating point (target list recall@{k} = {protocol['target_recall']}, thresholds "
        "cross-fitted across two patient folds):",
        "",
        f"| method | accuracy | precision | recall | F1 | list recall@{k} | list precision | empty lists | "
        "NIH per-finding mAP@10 (macro) | random ranking |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in available:
        op = m["operating_point"]
        nf = m.get("nih_findings") or {}
        finding = _md({"value": nf.get("macro"), "ci95": nf.get("macro_ci95")}) if nf else "–"
        lines.append(f"| {m['title']} | {_md(op['accuracy'])} | {_md(op['precision'])} | {_md(op['recall'])} | "
                     f"{_md(op['f1'])} | {_md(op['list_recall'])} | {_md(op['list_precision'])} | "
                     f"{_md(op['empty_rate'])} | {finding} | {_md(nf.get('random_macro')) if nf else '–'} |")
    lines += ["", "At the break-even point (pairwise precision = recall; chosen on the evaluation data):", "",
              "| method | accuracy | precision | recall | F1 | threshold |", "|---|---|---|---|---|---|"]
    for m in available:
        be = m["break_even"]
        lines.append(f"| {m['title']} | {_md(be['accuracy'])} | {_md(be['precision'])} | {_md(be['recall'])} | "
                     f"{_md(be['f1'])} | {_md(be['threshold'], 4)} |")
    lines += ["", "Ranking (mean over queries):", "",
              "| method | P@1 | P@10 | R@10 | mAP@10 | nDCG@10 | P@50 |", "|---|---|---|---|---|---|---|"]
    for m in available:
        r = m["ranking"]
        lines.append(f"| {m['title']} | {_md(r['P@1'])} | {_md(r['P@10'])} | {_md(r['R@10'])} | "
                     f"{_md(r['mAP@10'])} | {_md(r['nDCG@10'])} | {_md(r.get('P@50'))} |")
    unavailable = [m for m in results["methods"] if not m.get("available")]
    for m in unavailable:
        lines += ["", f"*{m['title']}: not evaluated — {m.get('unavailable_reason')}*"]
    lines += ["", "| method | features (s) | metrics (s) |", "|---|---|---|"]
    for m in results["methods"]:
        lines.append(f"| {m['title']} | {m.get('seconds_features', '–')}{' (cached)' if m.get('cached') else ''} | "
                     f"{m.get('seconds_metrics', '–')} |")
    return "\n".join(lines) + "\n"
