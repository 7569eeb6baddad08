"""The evaluation report: ``results.json`` (every number), ``plots/*.png`` and ``index.html``, a single file with the
plots and thumbnails embedded, so it opens without internet and can be moved on its own.

Thumbnails of the images appear only in the HTML under the report folder (git-ignored ``reports/``), never in docs.
"""

from __future__ import annotations

import base64
import html
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

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222;
line-height:1.45;padding:0 16px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.9em}th,td{border:1px solid #ddd;padding:4px 8px;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}.ci{color:#777;font-size:0.85em}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:6px 0}
.bad{background:#fdecea;border-left:4px solid #d62728;padding:6px 10px;margin:6px 0}
img.plot{max-width:100%;border:1px solid #eee;margin:6px 0}
.grid td{vertical-align:top;text-align:center;font-size:0.75em;width:120px}.grid img{width:112px;height:112px;
object-fit:contain;background:#000}.rel{border:3px solid #2ca02c}.irr{border:3px solid #d62728}
.q{border:3px solid #1f77b4}.below{opacity:0.45}dl dt{font-weight:bold;margin-top:6px}
"""


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


def _img_tag(path: Path, cls: str = "plot", alt: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img class='{cls}' alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


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


def render_html(results: dict, plots: dict[str, Path], images_root: Path | None) -> str:
    e = html.escape
    data, protocol, methods = results["data"], results["protocol"], results["methods"]
    available = _available(results)
    k = protocol["list_k"]
    target = protocol["target_recall"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>medsim evaluation</title>"
             f"<style>{CSS}</style></head><body>"]
    parts.append("<h1>medsim evaluation: similar-case retrieval on chest X-rays</h1>")
    parts.append(f"<p>{e(results['created_at'])}. Command: <code>{e(results.get('command') or '')}</code>. "
                 f"Wall time {results.get('wall_seconds', 0):.0f} s.</p>")
    parts.append(
        f"<p><b>Data</b>: {data['images']} labeled images of {data['patients']} patients under "
        f"<code>{e(data['images_dir'])}</code> (labels <code>{e(data['labels_csv'])}</code>). Sources: "
        + ", ".join(f"{e(s)} {n}" for s, n in data["sources"].items()) + ".</p>")
    parts.append(
        f"<p><b>Protocol</b>: every image is a query against all the others (the gallery); the query itself"
        f"{'' if protocol['include_same_patient'] else ' and every image of its own patient are'}"
        f"{' is' if protocol['include_same_patient'] else ''} excluded. A gallery image is <b>relevant</b> when it "
        f"{e(protocol['relevance_text'])}. {protocol['valid_pairs']:,} query/gallery pairs, "
        f"{protocol['relevant_pairs']:,} relevant: base rate {100 * (protocol['pairwise_base_rate'] or 0):.1f} %. "
        f"{protocol['queries_with_relevant']} of {protocol['queries']} queries have at least one relevant image.</p>")
    for note in data.get("notes", []) + results.get("notes", []):
        parts.append(f"<div class='note'>{e(note)}</div>")
    for m in methods:
        if not m.get("available"):
            parts.append(f"<div class='bad'><b>{e(m['title'])}: not evaluated.</b> "
                         f"{e(m.get('unavailable_reason') or '')}</div>")

    # Paper-style table at the operating point.
    parts.append("<h2>Paper-style table: pairwise metrics at the calibrated operating point</h2>")
    parts.append(
        f"<p>Threshold per method: the one reaching list recall@{k} = {target} (definition below), cross-fitted "
        f"across two patient folds. Accuracy, precision, recall and F1 are the method paper's pairwise set metrics "
        f"at that threshold; the list figures beside them are what a user of a top-{k} list sees. 95 % bootstrap "
        f"CIs in brackets.</p>")
    head = ("<tr><th class='l'>method</th><th>accuracy</th><th>precision</th><th>recall</th><th>F1</th>"
            f"<th>list recall@{k}</th><th>list precision</th><th>P@{k} without threshold</th>"
            "<th>empty lists</th><th>kept / query</th><th>threshold (fold 0 / 1)</th></tr>")
    rows = []
    for m in available:
        op = m["operating_point"]
        th = op["thresholds"]
        rows.append(
            f"<tr><td class='l'>{e(m['title'])}</td><td>{_fmt(op['accuracy'])}</td><td>{_fmt(op['precision'])}</td>"
            f"<td>{_fmt(op['recall'])}</td><td>{_fmt(op['f1'])}</td><td>{_fmt(op['list_recall'])}</td>"
            f"<td>{_fmt(op['list_precision'])}</td><td>{_fmt(op.get(f'precision_at_{k}_without_threshold'))}</td>"
            f"<td>{_fmt(op['empty_rate'])}</td><td>{_fmt(op['kept_per_query'], 1)}</td>"
            f"<td>{_fmt(th.get('fold0'), 4)} / {_fmt(th.get('fold1'), 4)}</td></tr>")
    parts.append(f"<table>{head}{''.join(rows)}</table>")

    parts.append("<h2>At the break-even point (pairwise precision = recall)</h2>")
    head = ("<tr><th class='l'>method</th><th>accuracy</th><th>precision</th><th>recall</th><th>F1</th>"
            "<th>threshold</th><th>pairwise AP</th></tr>")
    rows = [f"<tr><td class='l'>{e(m['title'])}</td><td>{_fmt(m['break_even']['accuracy'])}</td>"
            f"<td>{_fmt(m['break_even']['precision'])}</td><td>{_fmt(m['break_even']['recall'])}</td>"
            f"<td>{_fmt(m['break_even']['f1'])}</td><td>{_fmt(m['break_even']['threshold'], 4)}</td>"
            f"<td>{_fmt(m['pairwise_average_precision'])}</td></tr>" for m in available]
    parts.append(f"<table>{head}{''.join(rows)}</table>")

    parts.append("<h2>Ranking metrics</h2>")
    ks = protocol["ks"]
    head = "<tr><th class='l'>method</th>" + "".join(
        f"<th>{name}@{kk}</th>" for kk in ks for name in ("P", "R", "mAP", "nDCG")) + "</tr>"
    rows = []
    for m in available:
        cells = "".join(f"<td>{_fmt(m['ranking'][f'{name}@{kk}'])}</td>" for kk in ks
                        for name in ("P", "R", "mAP", "nDCG"))
        rows.append(f"<tr><td class='l'>{e(m['title'])}</td>{cells}</tr>")
    parts.append(f"<div style='overflow-x:auto'><table>{head}{''.join(rows)}</table></div>")

    for name, heading, caption in (
            ("pr_curves", "Precision-recall curves", "Pairwise precision-recall curves of all methods, with the "
             "break-even points (o) and the calibrated operating points (*)."),
            ("list_curves", "The operating point on the result list", f"List recall@{k} against list precision as "
             "the threshold moves; * = the calibrated operating point."),
            ("p_at_k", "Precision at k", "Mean P@k for k = 1..50."),
            ("per_finding", "Per finding", "P@10 per finding (relevant = has the finding), with 95 % CIs."),
            ("per_source", "Per source", "P@10 per query source, and the share of top-10 results from the "
             "query's own source.")):
        if name in plots:
            parts.append(f"<h2>{e(heading)}</h2><p>{e(caption)}</p>" + _img_tag(plots[name], alt=name))

    # Per-finding and per-source tables.
    findings = sorted({f for m in available for f in m.get("per_finding", {})})
    if findings:
        parts.append("<h2>Per-finding breakdown</h2><p>" + e(protocol["definitions"]["per_finding"]) + "</p>")
        head = "<tr><th class='l'>finding</th><th>queries</th><th>base rate</th>" + "".join(
            f"<th>{e(m['key'])} P@10</th><th>{e(m['key'])} mAP@10</th>" for m in available) + "</tr>"
        rows = []
        for f in findings:
            first = next(m["per_finding"][f] for m in available if f in m["per_finding"])
            cells = "".join(
                f"<td>{_fmt(m['per_finding'].get(f, {}).get('P@10'))}</td>"
                f"<td>{_fmt(m['per_finding'].get(f, {}).get('mAP@10'))}</td>" for m in available)
            rows.append(f"<tr><td class='l'>{e(f)}</td><td>{first['queries']}</td><td>{_fmt(first['base_rate'])}</td>"
                        f"{cells}</tr>")
        parts.append(f"<div style='overflow-x:auto'><table>{head}{''.join(rows)}</table></div>")
    sources = sorted({s for m in available for s in m.get("per_source", {})})
    if sources:
        parts.append("<h2>Per-source breakdown</h2><p>" + e(protocol["definitions"]["per_source"]) + "</p>")
        head = "<tr><th class='l'>source</th><th>queries</th><th>base rate</th>" + "".join(
            f"<th>{e(m['key'])} P@10</th><th>{e(m['key'])} mAP@10</th><th>{e(m['key'])} BEP F1</th>"
            f"<th>{e(m['key'])} same source</th>" for m in available) + "</tr>"
        rows = []
        for s in sources:
            first = next(m["per_source"][s] for m in available if s in m["per_source"])
            cells = "".join(
                f"<td>{_fmt(m['per_source'].get(s, {}).get('P@10'))}</td>"
                f"<td>{_fmt(m['per_source'].get(s, {}).get('mAP@10'))}</td>"
                f"<td>{_fmt(m['per_source'].get(s, {}).get('break_even_f1'))}</td>"
                f"<td>{_fmt(m['per_source'].get(s, {}).get('same_source_in_top10'))}</td>" for m in available)
            rows.append(f"<tr><td class='l'>{e(s)}</td><td>{first['queries']}</td>"
                        f"<td>{_fmt(first['pairwise_base_rate'])}</td>{cells}</tr>")
        parts.append(f"<div style='overflow-x:auto'><table>{head}{''.join(rows)}</table></div>")

    # Methods' details.
    parts.append("<h2>Methods</h2><table><tr><th class='l'>method</th><th class='l'>details</th>"
                 "<th>features (s)</th><th>metrics (s)</th></tr>")
    for m in methods:
        info = dict(m.get("info") or {})
        detail = "; ".join(f"{e(str(key))}: {e(json.dumps(value) if isinstance(value, dict) else str(value))}"
                           for key, value in info.items())
        if m.get("note"):
            detail = e(m["note"]) + ("; " + detail if detail else "")
        if not m.get("available"):
            detail = "<b>unavailable</b>: " + e(m.get("unavailable_reason") or "")
        parts.append(f"<tr><td class='l'>{e(m['title'])}</td><td class='l'>{detail}</td>"
                     f"<td>{m.get('seconds_features', '')}{' (cached)' if m.get('cached') else ''}</td>"
                     f"<td>{m.get('seconds_metrics', '')}</td></tr>")
    parts.append("</table>")

    # Examples.
    if images_root is not None and available and available[0].get("examples"):
        items = data["items"]
        thumbs: dict[int, str | None] = {}

        def thumb(i):
            if i not in thumbs:
                thumbs[i] = _thumbnail(str(Path(images_root) / items[i]["path"]))
            return thumbs[i]

        parts.append(
            "<h2>Example queries</h2><p>Each block: the query (blue) and its top results per method, with score and "
            "labels; green border = relevant, red = not relevant; faded = below the method's calibrated threshold "
            "(dropped from a thresholded list). Images of other patients only.</p>")
        for n, example in enumerate(available[0]["examples"]):
            q = example["query"]
            qi = items[q]
            parts.append("<table class='grid'><tr>")
            src = thumb(q)
            parts.append(f"<td><img class='q' src='{src or ''}' alt='query'><br><b>query</b><br>"
                         f"{e('|'.join(qi['labels']))}<br>{e(qi['source'])}</td>")
            parts.append("</tr></table><table class='grid'>")
            for m in available:
                hits = m["examples"][n]["hits"] if n < len(m["examples"]) else []
                cells = [f"<td class='l' style='width:140px'><b>{e(m['title'])}</b></td>"]
                for hit in hits:
                    item = items[hit["item"]]
                    cls = "rel" if hit["relevant"] else "irr"
                    fade = "" if hit["above_threshold"] else " below"
                    cells.append(f"<td class='{fade.strip()}'><img class='{cls}' src='{thumb(hit['item']) or ''}' "
                                 f"alt='result'><br>{hit['score']:.3f}<br>{e('|'.join(item['labels']))}<br>"
                                 f"<span class='ci'>{e(item['source'])}</span></td>")
                parts.append("<tr>" + "".join(cells) + "</tr>")
            parts.append("</table>")

    # Definitions.
    parts.append("<h2>Definitions</h2><dl>")
    titles = {"pairwise": "Pairwise set metrics (accuracy, precision, recall, F1)",
              "break_even": "Break-even point", "operating_point": "Calibrated operating point",
              "list_recall": f"List recall@{k}, list precision, empty rate", "ranking": "Ranking metrics",
              "bootstrap": "Confidence intervals", "per_finding": "Per finding", "per_source": "Per source"}
    for key, text in protocol["definitions"].items():
        parts.append(f"<dt>{e(titles.get(key, key))}</dt><dd>{e(text)}</dd>")
    parts.append(
        f"<dt>Why list recall and not pairwise recall</dt><dd>With this relevance, "
        f"{100 * (protocol['pairwise_base_rate'] or 0):.0f} % of all pairs are relevant, so any threshold that keeps "
        f"90 % of all relevant pairs keeps most pairs of any kind and leaves pairwise precision near that base rate "
        f"for every method. List recall asks the question a user has: of the relevant cases my top-{k} list showed, "
        f"how many does the threshold keep, and what does it cost (list precision, empty lists).</dd>")
    parts.append("</dl><p class='ci'>Every number on this page is in results.json next to it.</p></body></html>")
    return "\n".join(parts)


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
        f"| method | accuracy | precision | recall | F1 | list recall@{k} | list precision | empty lists |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in available:
        op = m["operating_point"]
        lines.append(f"| {m['title']} | {_md(op['accuracy'])} | {_md(op['precision'])} | {_md(op['recall'])} | "
                     f"{_md(op['f1'])} | {_md(op['list_recall'])} | {_md(op['list_precision'])} | "
                     f"{_md(op['empty_rate'])} |")
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
