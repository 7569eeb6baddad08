"""docs/performance.md and its plots (docs/images/perf-*.png) from the latest benchmarks/results/*.json.

    python -m benchmarks.report
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from benchmarks.bench_search import MEDSIM_DEFAULT
from benchmarks.common import DOCS, PLOTS, RESULTS, say

GOAL_BUILD_RATIO = 0.90
GOAL_ROOFLINE_SHARE = 0.70
ISSUE_BF16_GFLOPS = 395.0  # the issue's figure for "this machine" (see the notes on the roofline)
GOAL_RECALL, GOAL_P99_MS, GOAL_BYTES = 0.95, 2.0, 4096


def _load(name: str, results: Path = RESULTS) -> dict | None:
    path = results / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _f(value, digits: int = 2, none: str = "–") -> str:
    if value is None:
        return none
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _machine_line(result: dict) -> str:
    m = result.get("machine", {})
    load = result.get("load_average_before"), result.get("load_average_after")
    loads = [x[0] for x in load if x]
    cpus = m.get("logical_cpus") or 1
    busy = loads and max(loads) > 1.25 * cpus
    text = (f"{m.get('cpu', '?')}, {cpus} logical CPUs, {m.get('memory_gib', '?')} GiB; flags "
            f"{', '.join(m.get('cpu_flags', [])) or '?'}; torch {m.get('torch', '?')}; {result.get('created_at', '')}; "
            f"1-min load average {', '.join(_f(x, 1) for x in loads) or '?'} (before, after)")
    if busy:
        text += " — **measured under load** (other jobs shared the cores)"
    return text


# ---- plots ---------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_embed(embed: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode in dict.fromkeys(r["mode"] for r in embed["speed"]):
        rows = [r for r in embed["speed"] if r["mode"] == mode]
        ax.plot([r["batch"] for r in rows], [r["images_per_s"] for r in rows], marker="o", label=mode)
    styles = {"fp32": ("k", "--"), "bf16": ("tab:green", ":"), "int8": ("tab:red", "-.")}
    for kind, value in embed["roofline_images_per_s"].items():
        color, style = styles.get(kind, ("grey", ":"))
        ax.axhline(value, color=color, linestyle=style, linewidth=1)
        ax.text(ax.get_xlim()[1] if False else 1, value, f" {kind} GEMM roofline {value:.1f}", va="bottom",
                fontsize=8, color=color)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s (224 px, VGG-16 to conv5_3)")
    ax.set_title("Embedding throughput by numeric mode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_search(search: dict, path: Path) -> None:
    plt = _plt()
    sizes = search["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.6 * len(sizes), 4), squeeze=False)
    for ax, entry in zip(axes[0], sizes):
        for cfg in entry["hnswlib"] + entry["faiss_hnsw"]:
            if "sweep" not in cfg:
                continue
            label = f"{cfg['library']} M={cfg['M']}"
            ax.plot([r["recall@10"] for r in cfg["sweep"]], [r["p99_ms"] for r in cfg["sweep"]], marker=".",
                    label=label)
        for row in entry["exact"]:
            if "p99_ms" in row:
                ax.scatter([row["recall@10"]], [row["p99_ms"]], marker="x", label=row["library"])
        ax.axvline(GOAL_RECALL, color="grey", linestyle=":", linewidth=1)
        ax.axhline(GOAL_P99_MS, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("recall@10")
        ax.set_ylabel("p99 single-query latency (ms)")
        ax.set_title(f"{entry['n']:,} vectors")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decode(decode: dict, path: Path) -> None:
    plt = _plt()
    rows = [r for r in decode["summary"]]
    labels = [f"{r['syntax']}\n({r['origin']})" for r in rows]
    readers = ("pydicom", "simpleitk", "medsim")
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(rows)), 4))
    width = 0.27
    for i, reader in enumerate(readers):
        values = [r.get(f"{reader}_megapixels_per_s") or 0 for r in rows]
        ax.bar([x + (i - 1) * width for x in range(len(rows))], values, width,
               label={"medsim": "medsim read + preprocess"}.get(reader, reader))
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("megapixels/s (one thread)")
    ax.set_title("Decode speed by transfer syntax")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_service(service: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, kind in zip(axes, ("indexed", "non-indexed")):
        rows = sorted((r for r in service["rows"] if r["kind"] == kind), key=lambda r: r["clients"])
        if not rows:
            continue
        ax.plot([r["clients"] for r in rows], [r["p50_ms"] for r in rows], marker="o", label="p50")
        ax.plot([r["clients"] for r in rows], [r["p99_ms"] for r in rows], marker="o", label="p99")
        ax2 = ax.twinx()
        ax2.bar([r["clients"] for r in rows], [r["requests_per_s"] for r in rows], alpha=0.2, color="grey",
                width=[0.4 * r["clients"] for r in rows])
        ax2.set_ylabel("requests/s (bars)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{kind} queries")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the page ------------------------------------------------------------------------------------------------------


def section_decode(decode: dict | None) -> list[str]:
    out = ["## 1. Decode", ""]
    if not decode:
        return out + ["Not run yet (`python -m benchmarks --only decode`).", ""]
    out += [f"Machine: {_machine_line(decode)}.", "",
            "One process, one thread, page cache warm; per syntax the median over its files of the per-file median "
            "time. `medsim` = `medsim.dicom.read_dicom` (header checks, decode, modality/VOI LUT, to display) + "
            "preprocessing to the 224 px model input: the per-image work of a build-index worker. *sample* = the "
            "16 sample DICOMs (0.6–2.5 MP, 8–16 bit); *cxr-export* = the JPEG Baseline DICOM export of the dev set "
            "(512 px, benchmark 3).", ""]
    rows = []
    for r in decode["summary"]:
        rows.append([r["syntax"], r["origin"], r["files"], _f(r["megapixels_median"]),
                     f"{_f(r['pydicom_images_per_s'], 1)} / {_f(r['pydicom_megapixels_per_s'], 1)}",
                     f"{_f(r['simpleitk_images_per_s'], 1)} / {_f(r['simpleitk_megapixels_per_s'], 1)}"
                     + (f" ({r['simpleitk_failed']} failed)" if r.get("simpleitk_failed") else ""),
                     f"{_f(r['medsim_images_per_s'], 1)} / {_f(r['medsim_megapixels_per_s'], 1)}"])
    out += [_table(["transfer syntax", "files", "n", "MP (median)", "pydicom img/s / MP/s", "SimpleITK img/s / MP/s",
                    "medsim read+prep img/s / MP/s"], rows), "",
            "![decode](images/perf-decode.png)", ""]
    failures = [f for f in decode["files"] if f.get("simpleitk_error") or f.get("pydicom_error")]
    for f in failures:
        out.append(f"* `{f['file']}` ({f['transfer_syntax_name']}): "
                   + "; ".join(f"{k.split('_')[0]}: {v}" for k, v in f.items() if k.endswith("_error")))
    if failures:
        out.append("")
    return out


def section_embed(embed: dict | None) -> list[str]:
    out = ["## 2. Embed", ""]
    if not embed:
        return out + ["Not run yet (`python -m benchmarks --only embed`).", ""]
    m = embed["model"]
    g = embed["gemm_gflops"]
    roof = embed["roofline_images_per_s"]
    out += [f"Machine: {_machine_line(embed)}; {embed.get('torch_threads')} torch threads.", "",
            f"FLOP convention: a multiply-add is 2 FLOP, for the model and the GEMM alike. VGG-16 up to conv5_3 "
            f"(medsim's embedding layer) at {m['image_size']} px = {m['multiply_adds_per_image'] / 1e9:.2f} G "
            f"multiply-adds = **{m['gflop_per_image']:.1f} GFLOP per image**. Measured GEMM (2048², torch/MKL/oneDNN, "
            f"best of repeats, the better of a run before and one after the sweep): fp32 **{_f(g['fp32'], 1)}**, "
            f"bf16 **{_f(g['bf16'], 1)}**, int8 **{_f(g['int8'], 1)}** GFLOP/s → roofline fp32 "
            f"{_f(roof['fp32'])}, bf16 {_f(roof['bf16'])}, int8 {_f(roof['int8'])} images/s.",
            ""]
    batches = sorted({r["batch"] for r in embed["speed"]})
    modes = list(dict.fromkeys(r["mode"] for r in embed["speed"]))
    rows = []
    for mode in modes:
        by_batch = {r["batch"]: r for r in embed["speed"] if r["mode"] == mode}
        best = embed["best_by_mode"].get(mode, {})
        own = {"bf16": "bf16", "int8": "int8"}.get(mode, "fp32")
        share = best.get("images_per_s", 0) / roof[own] if roof.get(own) else 0
        rows.append([mode] + [_f(by_batch[b]["images_per_s"]) if b in by_batch else "–" for b in batches]
                    + [_f(best.get("gflops"), 1), f"{100 * share:.0f} % of {own}"])
    out += [_table(["mode \\ batch"] + [str(b) for b in batches] + ["best GFLOP/s", "of its GEMM roofline"], rows),
            ""]
    extra = {k: v for k, v in embed.get("modes", {}).items() if v and set(v) - {"describe"}}
    for mode, info in extra.items():
        out.append(f"* {mode}: " + ", ".join(f"{k} = {v}" for k, v in info.items() if k != "describe"))
    if extra:
        out.append("")
    out += ["![embed](images/perf-embed.png)", ""]
    q = embed.get("quality", {})
    if q.get("available"):
        out += [f"Retrieval quality per mode on the dev set (`../shared/data/cxr`, {q['images']} images, "
                f"{q['patients']} patients; mAP@10 as `medsim evaluate` computes it: leave-one-out, own patient "
                f"excluded, relevant = shares a label). A mode may be the default only if its mAP@10 is within 0.005 "
                f"of fp32 (the issue's rule); the cosine of each image's vector to its fp32 vector is shown too. "
                f"int8 is scored here with the ImageNet bundle calibrated on the 16 sample PACS images; a trained "
                f"bundle carries its own calibration and check (docs/model-card.md).", ""]
        rows = []
        for mode, r in q.get("modes", {}).items():
            c = r.get("cosine_to_fp32", {})
            rows.append([mode, r["images"], _f(r["mAP@10"], 4), _f(r.get("mAP@10_fp32_same_images",
                                                                          q["modes"]["fp32"]["mAP@10"]), 4),
                         f"{r['delta_vs_fp32']:+.4f}", _f(c.get("min"), 5) if c else "1 (reference)",
                         _f(c.get("mean"), 5) if c else "–",
                         "yes" if r["within_0.005"] else "**no**"])
        out += [_table(["mode", "images", "mAP@10", "fp32 mAP@10 (same images)", "Δ", "min cosine to fp32",
                        "mean cosine", "keeps quality"], rows), ""]
    return out


def section_build(build: dict | None, others: list[dict] | None = None) -> list[str]:
    out = ["## 3. Build-index end to end", ""]
    if not build:
        return out + ["Not run yet (`python -m benchmarks --only build`).", ""]
    if build.get("skipped"):
        return out + [f"Skipped: {build['skipped']}.", ""]
    e = build["export"]
    out += [f"Machine: {_machine_line(build)}.", "",
            f"`medsim build-index` from scratch in a fresh process (default workers = {build['workers']}, batch 16, "
            f"default mode), on `../shared/data/cxr` and on its DICOM export ({e['files']} files, "
            f"{', '.join(f'{v} {k}' for k, v in e['by_transfer_syntax'].items())}; written to var/bench at run "
            f"time in {e['seconds']} s). Embed-only = the same Embedder on {build['embed_only_images']} "
            f"already-prepared images in memory, measured just before and after each build (mean of the two).", ""]
    rows = []
    for name, r in build["builds"].items():
        bound = r.get("shared_core_bound_images_per_s")
        rows.append([name, r["indexed"], _f(r["build_seconds"], 0), _f(r["images_per_s"], 3),
                     _f(r["embed_only_images_per_s"], 3), f"**{100 * r['ratio_end_to_end_to_embed_only']:.0f} %**",
                     _f(r.get("decode_only_images_per_s"), 1), _f(bound, 1),
                     f"{100 * r['images_per_s'] / bound:.0f} %" if bound else "–",
                     f"{_f(r['load_average_before'][0], 1)} → {_f(r['load_average_after'][0], 1)}",
                     r.get("printed_mode") or "–"])
    out += [_table(["source", "images", "build s", "end-to-end img/s", "embed-only img/s", "ratio",
                    "decode-only img/s (1 worker)", "shared-core bound img/s", "build / bound",
                    "load (1 min)", "mode printed by build-index"], rows), "",
            "Decode-only: one build-index worker's work (`process_file`: read, preprocessing, pixel hash, pHash) on "
            "240 of the source's files in one process. Shared-core bound: 1 / (1/embed + 1/decode), what a build "
            "can reach when both sides are CPU-bound on the same two cores (the worker's CPU seconds are taken from "
            "the embedder); ≥ 90 % of embed-only would need decode-only ≥ 9 × embed-only.", "",
            "![build](images/perf-build.png)", ""]
    for other in others or []:
        mode = other["builds"]["cxr"]["printed_mode"]
        out += [f"With another embedding mode (`python -m benchmarks.bench_build --mode "
                f"{mode.split(' ')[0]} --limit {other['settings']['limit']}`, {_machine_line(other)}):", "",
                _table(["source", "images", "build s", "end-to-end img/s", "embed-only img/s", "ratio", "mode"],
                       [[name, r["indexed"], _f(r["build_seconds"], 0), _f(r["images_per_s"], 3),
                         _f(r["embed_only_images_per_s"], 3),
                         f"**{100 * r['ratio_end_to_end_to_embed_only']:.0f} %**", r.get("printed_mode") or "–"]
                        for name, r in other["builds"].items()]), ""]
    disk = build["builds"].get("cxr", {}).get("index_on_disk")
    if disk:
        out += ["Index on disk after the cxr build: " + ", ".join(
            f"`{name}` {v['bytes_per_case']:.0f} B per case" for name, v in sorted(disk.items()))
            + " (the catalog row holds the float32 vector, UIDs, labels, path and attributes).", ""]
    q = build.get("default_mode_quality")
    if q and q.get("bundle_int8_check"):
        c, b = q["bundle_int8_check"], q.get("bundle", {})
        when = (f" (from the run of {q['measured_at'][:10]}; this run's bundle, a stand-in for timing, was not scored)"
                if q.get("measured_at") else "")
        out += [f"Quality of the default mode{when}: the build used the trained bundle `{b.get('name')}` "
                f"({b.get('fingerprint')}), whose own check (written by `medsim train`, on its "
                f"{c['validation_images']} validation images, which it never trained on) gives mAP@10 "
                f"**{c['mAP@10_int8']:.4f}** in int8 against {c['mAP@10_fp32']:.4f} in float32 (Δ "
                f"{c['delta_mAP@10']:+.4f}; NIH {c['nih_mAP@10_int8']:.4f} against {c['nih_mAP@10_fp32']:.4f}); "
                f"cosine of int8 to float32 vectors min {c['cosine_int8_to_fp32']['min']:.4f}, mean "
                f"{c['cosine_int8_to_fp32']['mean']:.4f}. (The mAP@10 of this build's vectors over the whole dev "
                f"set, {q['mAP@10']:.4f}, includes the bundle's training images and says nothing about quality.)", ""]
    elif q and "mAP@10" in q:
        line = (f"Quality of the default mode on the production path (the vectors this build wrote, "
                f"{q['images']} images): mAP@10 **{q['mAP@10']:.4f}**")
        if "mAP@10_fp32" in q:
            c = q["cosine_to_fp32"]
            line += (f" against fp32 {q['mAP@10_fp32']:.4f} (Δ {q['delta_vs_fp32']:+.4f}); cosine to the fp32 "
                     f"vectors min {c['min']:.6f}, mean {c['mean']:.6f}")
        out += [line + ".", ""]
    return out


def section_search(search: dict | None) -> list[str]:
    out = ["## 4. Search", ""]
    if not search:
        return out + ["Not run yet (`python -m benchmarks --only search`).", ""]
    s = search["settings"]
    out += [f"Machine: {_machine_line(search)}.", "",
            f"Vectors: {s['generator']}. k = {s['k']}; hnswlib and faiss HNSW with ef_construction = "
            f"{s['ef_construction']}; single-query latency with {s['threads_single_query']} thread, one query at a "
            f"time; batched = all queries in one call on {s['threads_batched']} threads. medsim's defaults: "
            f"M = {MEDSIM_DEFAULT['M']}, ef_construction = {MEDSIM_DEFAULT['ef_construction']}, "
            f"ef = {MEDSIM_DEFAULT['ef']} (`medsim.index.CaseIndex.create`; ef was 128 until the 1M run showed p99 "
            f"2.11 ms there, against 1.12 ms at ef = 64 with the same recall).", ""]
    for entry in search["sizes"]:
        d = entry["data"]
        out += [f"### {entry['n']:,} vectors ({entry['queries']} queries; mean cosine of a query to its nearest "
                f"neighbour {d['mean_cosine_query_to_nearest']}, of a random pair {d['mean_cosine_random_pair']})",
                ""]
        if entry.get("machine_line"):
            out += [f"Measured separately (`--with-1m`): {entry['machine_line']}.", ""]
        rows = []
        for r in entry["exact"]:
            if "error" in r:
                rows.append([r["library"], "–", "–", r["error"], "", "", "", ""])
                continue
            rows.append([r["library"], "–", "–", _f(r["recall@10"], 4), _f(r["p50_ms"], 3), _f(r["p99_ms"], 3),
                         _f(r["batched_qps"], 0),
                         f"{r.get('build_seconds', 0):.1f} s / {r['memory_bytes_per_vector']} B"])
        for cfg in entry["hnswlib"] + entry["faiss_hnsw"]:
            if "sweep" not in cfg:
                rows.append([cfg.get("library", "?"), cfg.get("M", ""), "", cfg.get("error", ""), "", "", "", ""])
                continue
            for r in cfg["sweep"]:
                rows.append([cfg["library"], cfg["M"], r["ef"], _f(r["recall@10"], 4), _f(r["p50_ms"], 3),
                             _f(r["p99_ms"], 3), _f(r["batched_qps"], 0),
                             f"{cfg['build_seconds']:.1f} s / {cfg['memory_bytes_per_vector_rss']:.0f} B"
                             if r is cfg["sweep"][0] else ""])
        out += [_table(["library", "M", "ef", "recall@10", "p50 ms", "p99 ms", "batched q/s",
                        "build / memory per vector"], rows), ""]
    out += ["![search](images/perf-search.png)", "",
            "Memory per vector is the growth of the anonymous resident memory of a fresh process while it builds "
            "the index (the input vectors are memory-mapped and not counted); numpy and faiss flat hold the "
            "float32 vectors only.", ""]
    return out


def section_service(service: dict | None) -> list[str]:
    out = ["## 5. Service", ""]
    if not service:
        return out + ["Not run yet (`python -m benchmarks --only service`).", ""]
    if service.get("skipped"):
        return out + [f"Skipped: {service['skipped']}.", ""]
    st = service["setup"]
    out += [f"Machine: {_machine_line(service)}.", "",
            f"`medsim serve` ({st['server_threads']} threads) on loopback with the loopback Orthanc of "
            f"`benchmarks/service_load.py` ({st['index_cases']} indexed cases, {st['non_indexed_instances']} "
            f"non-indexed instances; vector cache off, so every non-indexed query is fetched by WADO-RS, decoded, "
            f"preprocessed and embedded). Closed-loop clients, each phase bounded to {st['phase_seconds_indexed']} s / "
            f"{st['max_requests_indexed']} requests (indexed) and {st['phase_seconds_non_indexed']} s / "
            f"{st['max_requests_non_indexed']} requests (non-indexed).", ""]
    rows = [[r["kind"], r["clients"], r["requests"], r["errors"], _f(r["requests_per_s"], 1), _f(r["p50_ms"], 1),
             _f(r["p99_ms"], 1), _f(r["server_took_ms_p50"], 1)] for r in service["rows"]]
    out += [_table(["query", "clients", "requests", "errors", "requests/s", "p50 ms", "p99 ms", "server took p50 ms"],
                   rows), "", "![service](images/perf-service.png)", "",
            f"Server alive after the load: {service['server_alive_after_load']}. The server engineer's own phases "
            "(paced and mixed load, goals) are in `benchmarks/results/service.json` (`benchmarks/service_load.py`).",
            ""]
    return out


def section_gpu(gpu: dict | None) -> list[str]:
    if not gpu:
        return []
    out = ["## GPU (beside the CPU figures)", "", f"Device: {gpu.get('device')}; host CPU {gpu.get('host_cpu')}; "
           f"torch {gpu.get('torch')}; {gpu.get('created_at', '')}.", ""]
    rows = [[r["device"], r["mode"], r["batch"], _f(r["images_per_s"], 1), _f(r.get("gflops"), 0)]
            for r in gpu.get("speed", [])]
    out += [_table(["device", "mode", "batch", "images/s", "GFLOP/s"], rows), ""]
    if gpu.get("gemm_tflops"):
        out += ["GEMM: " + ", ".join(f"{k} {v} TFLOP/s" for k, v in gpu["gemm_tflops"].items()), ""]
    if gpu.get("cosine_to_fp32"):
        out += ["Cosine to the device's fp32 vectors (synthetic radiographs): " +
                ", ".join(f"{k} min {v}" for k, v in gpu["cosine_to_fp32"].items()), ""]
    return out


def goals(embed, build, search, realistic_rows: list[list] | None = None) -> list[str]:
    out = ["## Goals", ""]
    rows = list(realistic_rows or [])
    if build and build.get("builds"):
        for name, r in build["builds"].items():
            ratio = r["ratio_end_to_end_to_embed_only"]
            rows.append([f"build-index end to end ≥ 90 % of embed-only ({name})", f"{100 * ratio:.0f} %",
                         "met" if ratio >= GOAL_BUILD_RATIO else f"missed by {100 * (GOAL_BUILD_RATIO - ratio):.0f} "
                                                                  f"points"])
    printed = [r.get("printed_mode") for r in (build or {}).get("builds", {}).values() if r.get("printed_mode")]
    if embed:
        fastest = max(embed["best_by_mode"].items(), key=lambda kv: kv[1]["images_per_s"])
        # the default bundle's mode, as build-index printed it (the ImageNet bundle's otherwise)
        default = printed[0].split(" ")[0] if printed else embed.get("default_mode")
        d = embed["best_by_mode"].get(default, {})
        per_image = embed["model"]["gflop_per_image"]
        issue_roof = ISSUE_BF16_GFLOPS / per_image
        bf16_roof = embed["roofline_images_per_s"]["bf16"]
        fp32_roof = embed["roofline_images_per_s"]["fp32"]
        rows.append([f"embed-only ≥ 70 % of the bf16 roofline (issue: {ISSUE_BF16_GFLOPS:.0f} GFLOP/s → "
                     f"{issue_roof:.1f} img/s)", f"{_f(d.get('images_per_s'))} img/s ({default}) = "
                     f"{100 * d.get('images_per_s', 0) / issue_roof:.0f} % of {issue_roof:.1f}",
                     "met" if d.get("images_per_s", 0) >= GOAL_ROOFLINE_SHARE * issue_roof else
                     "missed" + (": no native bf16 on this CPU (see notes)" if not embed["machine"].get("native_bf16")
                                 else "")])
        own = {"int8": "int8", "bf16": "bf16"}.get(default, "fp32")
        own_roof = embed["roofline_images_per_s"][own]
        rows.append(["… against this CPU's measured rooflines", f"{default} against the {own} GEMM roofline "
                     f"{_f(own_roof)} img/s → {100 * d.get('images_per_s', 0) / own_roof:.0f} %; fp32 roofline "
                     f"{_f(fp32_roof)}, bf16 (measured, emulated) {_f(bf16_roof)} img/s",
                     "met" if d.get("images_per_s", 0) >= GOAL_ROOFLINE_SHARE * own_roof else
                     f"{100 * d.get('images_per_s', 0) / own_roof:.0f} % of {own}"])
        q = embed.get("quality", {}).get("modes", {})
        keep = [m for m, r in q.items() if r["within_0.005"]] + ["channels_last"]  # channels_last: fp32 exactly
        rows.append(["fastest mode without quality loss is the default; build-index prints it",
                     f"default {default} (printed: {printed[0] if printed else '?'}); fastest measured "
                     f"{fastest[0]} ({_f(fastest[1]['images_per_s'])} img/s); modes within 0.005 mAP@10 of fp32: "
                     f"{', '.join(sorted(set(keep)))}",
                     "met" if default in keep and default == fastest[0] else
                     ("met among the Embedder's modes" if default in keep else "check")])
    if search and search.get("goal"):
        g = search["goal"]
        best = g.get("best_meeting_recall_0.95")
        n = g.get("n")
        if best:
            rows.append([f"search at 1M: recall@10 ≥ 0.95 with p99 ≤ 2 ms (largest run: {n:,})",
                         f"M={best['M']} ef={best['ef']}: recall {best['recall@10']:.3f}, p99 {best['p99_ms']:.2f} ms",
                         ("met" if g["met"] else f"missed by {best['p99_ms'] - GOAL_P99_MS:.2f} ms")
                         if n >= 1_000_000 else "not measured at 1M yet (`--with-1m`)"])
        else:
            rows.append([f"search at 1M (largest run: {n:,})", "no setting reached recall 0.95", "missed"])
        d = g.get("medsim_default")
        if d:
            ok = d["recall@10"] >= GOAL_RECALL and d["p99_ms"] <= GOAL_P99_MS
            rows.append([f"… with medsim's index defaults (M={d['M']}, ef={d['ef']})",
                         f"recall {d['recall@10']:.3f}, p99 {d['p99_ms']:.2f} ms", "met" if ok else "missed"])
        for entry in search["sizes"][-1:]:
            measured = [c for c in entry["hnswlib"] if "memory_bytes_per_vector_rss" in c]
            cfg = next((c for c in measured if c.get("M") == MEDSIM_DEFAULT["M"]),
                       measured[0] if measured else None)
            if cfg:
                b = cfg["memory_bytes_per_vector_rss"]
                catalog = ((build or {}).get("builds", {}).get("cxr", {}).get("index_on_disk", {})
                           .get("catalog.sqlite", {}).get("bytes_per_case"))
                rows.append([f"memory per indexed case ≤ 4 KB at 512-d (hnswlib M={cfg['M']}, {entry['n']:,} vectors)",
                             f"{b:.0f} B in memory measured, {cfg['memory_bytes_per_vector_formula']:.0f} B by "
                             f"formula" + (f"; plus the catalog row, {catalog:.0f} B on disk" if catalog else ""),
                             "met" if b <= GOAL_BYTES else "missed"])
    return out + [_table(["goal", "measured", "status"], rows), ""]



REALISTIC_NAMES = {"uncompressed": "uncompressed (Explicit VR LE)", "jpeg-lossless": "JPEG Lossless SV1",
                   "jpeg-ls": "JPEG-LS lossless", "j2k-lossless": "JPEG 2000 lossless", "j2k-lossy": "JPEG 2000 lossy",
                   "rle": "RLE Lossless", "jpeg-baseline": "JPEG Baseline (8 bit)"}
REDUCED_CAPABLE = ("uncompressed", "j2k-lossless", "j2k-lossy", "jpeg-baseline")


def goals_realistic(decode: dict | None, build: dict | None) -> list[list]:
    """Goal rows of issue 14 (full-resolution export)."""
    rows = []
    if build and build.get("builds"):
        for syntax, r in build["builds"].items():
            name = REALISTIC_NAMES.get(syntax, syntax)
            ratio = r["ratio_steady_to_min_embed_decode"]
            rows.append([f"full-res build-index ≥ 90 % of min(embed-only, decode-only) ({name})",
                         f"{100 * ratio:.0f} % (steady; whole run {100 * r['images_per_s'] / min(r['embed_only_images_per_s'], r['decode_only_images_per_s'] or 1e9):.0f} %)",
                         "met" if ratio >= GOAL_BUILD_RATIO else f"missed by {100 * (GOAL_BUILD_RATIO - ratio):.0f} points"])
            if syntax in REDUCED_CAPABLE:
                ratio = r["ratio_steady_to_embed_only"]
                rows.append([f"… ≥ 90 % of embed-only (reduced decoding: {name})", f"{100 * ratio:.0f} %",
                             "met" if ratio >= GOAL_BUILD_RATIO else
                             f"missed by {100 * (GOAL_BUILD_RATIO - ratio):.0f} points"])
    q = (decode or {}).get("quality")
    if q:
        rows.append([f"same answers: cosine reduced vs full ≥ 0.995 per image ({q['images']} images, every syntax)",
                     f"min {q['min_cosine']:.4f}, mean {q['mean_cosine']:.4f}", "met" if q["cosine_ok"] else "missed"])
        rows.append(["… and mAP@10 within 0.005", f"{q['mAP@10_reduced']:.4f} reduced against {q['mAP@10_full']:.4f} "
                     f"full (Δ {q['mAP_delta']:+.4f})", "met" if q["mAP_ok"] else "missed"])
    return rows


def section_realistic(decode: dict | None, build: dict | None) -> list[str]:
    out = ["## 6. Full-resolution PACS export (issue 14)", ""]
    if not decode or decode.get("skipped"):
        return out + ["Not run yet: `python -m benchmarks.bench_decode --realistic` then "
                      "`python -m benchmarks.bench_build --realistic`.", ""]
    export = decode.get("export", {})
    out += [f"Machine: {_machine_line(decode)}.", "",
            f"The export (`benchmarks/realistic_export.py`, generated into the git-ignored `var/bench/realistic`, "
            f"never committed): {export.get('files')} DICOM files, {export.get('bytes', 0) / 1e9:.2f} GB, median "
            f"{_f(export.get('megapixels_median'), 1)} MP, CR and DX, 8-16 bits stored, MONOCHROME1 and 2, Patient/"
            "Study/Series folders and a DICOMDIR; **real chest X-rays of the dev set upsampled** (Lanczos) to "
            "2,000-3,500 px with 0.4 % noise, since no full-resolution originals may be copied here "
            "(its README says so).", "",
            "Per syntax, on its largest files, one process and one thread: each full decoder (pydicom's plugins, "
            "SimpleITK) alone, then medsim's full read (checks, decode, LUTs) + preprocessing to 224 px, and medsim's "
            "reduced read as build-index does it (`read_dicom(min_side=896)`, short side ≥ 4 × the model input) + "
            "preprocessing. images/s (MP/s of the full image).", ""]
    rows = []
    names = ["pylibjpeg", "gdcm", "pydicom-numpy", "pillow", "simpleitk"]
    for e in decode["summary"]:
        cells = [REALISTIC_NAMES.get(e["syntax"], e["syntax"]), e["files_timed"], _f(e["megapixels_median"], 1)]
        for n in names:
            ips = e.get(f"{n}_images_per_s")
            cells.append(f"{_f(ips)} / {_f(e.get(f'{n}_megapixels_per_s'), 0)}" if ips else "–")
        full, red = e.get("medsim_full_images_per_s"), e.get("medsim_reduced_images_per_s")
        cells += [_f(full), _f(red), f"{red / full:.1f}×" if full and red else "–", e["decoder"]]
        rows.append(cells)
    out += [_table(["syntax", "files", "MP", "pylibjpeg", "gdcm", "pydicom numpy", "pillow", "SimpleITK",
                    "medsim full img/s", "medsim reduced img/s", "speed-up", "reduced path (chosen)"], rows), ""]
    q = decode.get("quality")
    if q:
        when = f" (measured {q['measured_at'][:10]}, kept from that run)" if q.get("measured_at") else ""
        out += [f"Same answers ({q['bundle']}, {q['mode']}{when}): embeddings of the reduced against the full decode, "
                f"{q['images']} images; mAP@10 with each image a query against the others plus {q['gallery']} fixed "
                "dev-set images (own patient excluded, relevant = shares a label).", ""]
        rows = [[REALISTIC_NAMES.get(k, k), v["images"], _f(v["min_cosine"], 4), _f(v["mean_cosine"], 4),
                 _f(v["mAP@10_full"], 4), _f(v["mAP@10_reduced"], 4)] for k, v in q["per_syntax"].items()]
        rows.append(["**all**", q["images"], _f(q["min_cosine"], 4), _f(q["mean_cosine"], 4),
                     _f(q["mAP@10_full"], 4), _f(q["mAP@10_reduced"], 4)])
        out += [_table(["syntax", "images", "min cosine", "mean cosine", "mAP@10 full", "mAP@10 reduced"], rows), ""]
    if build and build.get("builds"):
        out += [f"build-index per syntax (`python -m benchmarks.bench_build --realistic`; {_machine_line(build)}): "
                "`medsim.build.build_index` in a fresh process, default bundle, mode and workers, on the syntax's "
                "files of the export. *Whole run* = indexed / wall time including model load and worker start; "
                "*steady* = images committed after the second batch / the time since (start-up, and the images the "
                "worker decoded during it, excluded). Embed-only: "
                "the same embedder on prepared tensors, before and after; decode-only: one worker's work "
                "(`process_file`: reduced read, LUTs, preprocessing, pHash) on the same files in one process, just "
                "before the build.", ""]
        rows = []
        for syntax, r in build["builds"].items():
            bound = min(r["embed_only_images_per_s"], r["decode_only_images_per_s"] or 1e9)
            shared = r.get("shared_core_bound_images_per_s")
            more = r.get("with_workers") or {}
            rows.append([REALISTIC_NAMES.get(syntax, syntax), r["indexed"], _f(r["images_per_s"]),
                         _f(r["steady_images_per_s"]), _f(r["embed_only_images_per_s"]),
                         _f(r["decode_only_images_per_s"]), f"**{100 * r['ratio_steady_to_min_embed_decode']:.0f} %**",
                         f"{100 * r['images_per_s'] / bound:.0f} %", _f(shared),
                         f"{100 * r['ratio_steady_to_shared_core_bound']:.0f} %" if shared else "–",
                         ", ".join(f"{n}: {_f(o['steady_images_per_s'] or o['images_per_s'])} "
                                   f"({100 * o['ratio_steady_to_embed_only']:.0f} % of embed)"
                                   for n, o in more.items()) or "–",
                         f"{r['peak_rss_main_bytes'] / 2**20:.0f} / {r['peak_rss_worker_bytes'] / 2**20:.0f}",
                         f"{r['load_average_before'][0]:.1f} → {r['load_average_after'][0]:.1f}"])
        out += [_table(["syntax", "images", "whole run img/s", "steady img/s", "embed-only img/s", "decode-only img/s",
                        "steady / min(embed, decode)", "whole run / min", "shared-core bound img/s",
                        "steady / bound", "more workers: steady img/s", "peak RSS MiB main / worker",
                        "load (1 min)"], rows), "",
                "Shared-core bound: 1 / (1/embed + 1/decode) (`bench_build.shared_core_bound`): with both sides "
                "CPU-bound on the same two cores, each image costs the embedder's and the worker's seconds; "
                "\"≥ 90 % of min(embed, decode)\" is only reachable when one side is ≥ 9 × the other. More "
                "workers: the same files with that many decoding processes (`--workers`), measured between the same "
                "embed-only runs.", ""]
        first = next(iter(build["builds"].values()))
        base = build.get("worker_baseline_rss_bytes") or 0
        worst = max(r["peak_rss_worker_bytes"] for r in build["builds"].values())
        pixels = max(r.get("largest_megapixels", 0) for r in build["builds"].values()) * 1e6 or 1
        main = max(r["peak_rss_main_bytes"] for r in build["builds"].values())
        out += [f"Memory: {first.get('workers')} decoding worker(s) (`default_workers()`), mode {first.get('mode')}. "
                f"A worker with its imports (torch, MONAI, the codecs) and nothing decoded holds {base / 2**20:.0f} "
                f"MiB; the largest worker peak was {worst / 2**20:.0f} MiB, i.e. {(worst - base) / 2**20:.0f} MiB for "
                f"decoding, {(worst - base) / pixels:.0f} bytes per pixel of the largest image ({pixels / 1e6:.1f} MP: "
                "the codec's output, masked and float32 copies, the block sums, the LUTs in float64 on the reduced "
                "image, preprocessing, codec libraries loaded on first use); the main process (model, index) peaked "
                f"at {main / 2**20:.0f} MiB.", ""]
        from benchmarks.bench_build import memory_check

        check = memory_check(build["builds"], base) if base else None
        if check and check["per_syntax"]:
            out += [f"Memory check (the builds ran on each syntax's largest files): {check['statement']}: "
                    + ("**holds** for every syntax (" if check["ok"] else "**fails** for at least one syntax (")
                    + ", ".join(f"{REALISTIC_NAMES.get(k, k)} {v['decoding_bytes'] / 2**20:.0f} of "
                                f"{v['allowed_bytes'] / 2**20:.0f} MiB" for k, v in check["per_syntax"].items())
                    + ").", ""]
    return out

def merge_search(search: dict | None, extra: dict | None) -> dict | None:
    """search.json (10k, 100k) plus search_1m.json (`--with-1m`, run separately), sizes in order."""
    if not extra:
        return search
    if not search:
        return extra
    from benchmarks.bench_search import goal_check

    sizes = {entry["n"]: entry for entry in search["sizes"]}
    sizes.update({entry["n"]: dict(entry, machine_line=_machine_line(extra)) for entry in extra["sizes"]})
    merged = dict(search, sizes=[sizes[n] for n in sorted(sizes)])
    merged["goal"] = goal_check(merged["sizes"])
    return merged


def _section(name: str, results: Path) -> list[str]:
    """The ``section_<name>`` of benchmarks/bench_<name>.py, imported only when the report is written (those modules
    pull in what their benchmark runs)."""
    module = importlib.import_module(f"benchmarks.bench_{name}")
    return getattr(module, f"section_{name}")(results)


def write(results: Path = RESULTS, docs: Path = DOCS, plots: Path = PLOTS, notes: str = "") -> Path:
    decode, embed, build = _load("decode", results), _load("embed", results), _load("build", results)
    search, service, gpu = _load("search", results), _load("service_clients", results), _load("embed_gpu", results)
    search = merge_search(search, _load("search_1m", results))
    plots.mkdir(parents=True, exist_ok=True)
    made = []
    for data, fn, name in ((embed, plot_embed, "perf-embed.png"), (search, plot_search, "perf-search.png"),
                           (decode, plot_decode, "perf-decode.png"), (service, plot_service, "perf-service.png"),
                           (build, plot_build, "perf-build.png")):
        if data and not data.get("skipped"):
            try:
                fn(data, plots / name)
                made.append(name)
            except Exception as exc:  # noqa: BLE001 - a plot must not lose the tables
                say(f"plot {name} failed: {exc}")
    lines = ["# Performance", "",
             "Measured by `python -m benchmarks` (see [Reproduce](#reproduce)); every number below comes from the "
             "latest `benchmarks/results/*.json`, and this page is regenerated from them by "
             "`python -m benchmarks.report`. Each section names the machine and how busy it was.", ""]
    decode_realistic, build_realistic = _load("decode_realistic", results), _load("realistic_build", results)
    lines += goals(embed, build, search, goals_realistic(decode_realistic, build_realistic))
    if notes:
        lines += [notes.strip(), ""]
    others = [_load(p.stem, results) for p in sorted(results.glob("build_*.json"))]
    lines += section_decode(decode) + section_embed(embed) + section_build(build, others) + section_search(search)
    lines += _section("filters", results)  # issue 15
    lines += section_service(service) + section_realistic(decode_realistic, build_realistic) + section_gpu(gpu)
    lines += _section("watch", results) + _section("ray", results) + _section("vector_store", results)  # 16, 17
    lines += ["## Reproduce", "",
              "    pip install -e '.[bench]'                 # faiss-cpu and matplotlib",
              "    python -m benchmarks --quick              # small sizes, a few minutes (CI-style check)",
              "    python -m benchmarks                      # the figures above, 1M search vectors left out",
              "    python -m benchmarks --full --with-1m     # also torch.compile and the 1M-vector search",
              "    python -m benchmarks --only embed,search  # some of them; then: python -m benchmarks.report",
              "    python -m benchmarks.bench_decode --realistic  # issue 14: full-resolution export (generated once)",
              "    python -m benchmarks.bench_build --realistic   # … and build-index per syntax on it",
              "    python -m benchmarks.bench_build_worker        # a worker's CPU per stage (pHash methods)", "",
              "Benchmarks 2 and 3 need `../shared/data/cxr` (read at run time only; exports, vectors and indexes go "
              "to the git-ignored `var/bench/`); benchmark 5 needs Orthanc (`make orthanc`). Without them those "
              "sections say they were skipped. The numbers depend on what else runs on the machine: compare runs "
              "only at a similar load average (recorded with every result).", ""]
    path = docs / "performance.md"
    path.write_text("\n".join(lines))
    return path


def plot_build(build: dict, path: Path) -> None:
    plt = _plt()
    names = list(build["builds"])
    fig, ax = plt.subplots(figsize=(6, 3.4))
    e2e = [build["builds"][n]["images_per_s"] for n in names]
    only = [build["builds"][n]["embed_only_images_per_s"] for n in names]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], only, 0.4, label="embed-only")
    ax.bar([x + 0.2 for x in xs], e2e, 0.4, label="build-index end to end")
    for x, a, b in zip(xs, only, e2e):
        ax.text(x + 0.2, b, f"{100 * b / a:.0f} %", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names)
    ax.set_ylabel("images/s")
    ax.set_title("build-index against embed-only")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    notes_file = RESULTS.parent / "notes.md"  # hand-written analysis of the latest run, shown under the goals
    path = write(notes=notes_file.read_text() if notes_file.exists() else "")
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
