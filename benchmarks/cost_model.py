"""How many CPU cores, CPU nodes and GPUs `build-index --ray` needs for N images in T hours, from measured per-image
costs (docs/scaling.md prints this table; it regenerates from benchmarks/results/*.json):

  decode d   CPU-core seconds per image to read, decode (reduced, as build-index does), apply the LUTs and preprocess,
             per transfer syntax: 1 / medsim_reduced_images_per_s of decode_realistic.json (one thread, ~10 MP
             radiographs; measured on a busy shared machine, so an upper bound)
  embed e    CPU-core seconds per image of the embedding model: torch threads / images per second of embed.json's
             best int8 run (VNNI CPU, fine-tuned bundle) and of channels_last (float32, any x86 CPU)
  GPU g      images per second of one GPU (embed_gpu.json, bf16, batch 16, H100)
  bytes b    bytes per stored image of that export (its size / its files): what storage must deliver, N b / T
  Ray r      the Ray path's throughput relative to the local build on the same machine (ray_build.json, steady
             state; 1.0 when not measured, and at most 1.0: on the busy 2-core machine it measured above 1 under load,
             which says more about thread counts under load than about Ray): the cluster's cores are divided by it

  CPU only:  cores = N (d + e) / (T r)
  with GPUs: GPUs = N / (g T), cores = N d / (T r)   (the GPUs' hosts must still decode: decoding dominates)

    python -m benchmarks.cost_model [--hours 24] [--cores-per-node 32]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from benchmarks.common import RESULTS

SIZES = (10**6, 10**7)


def _load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def inputs() -> dict:
    """The measured per-image costs the model uses, with where each comes from."""
    decode = _load("decode_realistic")
    embed = _load("embed")
    gpu = _load("embed_gpu")
    ray = _load("ray_build")
    threads = embed.get("torch_threads", 2)
    best = embed.get("best_by_mode", {})
    gpu_bf16 = max((s["images_per_s"] for s in gpu.get("speed", []) if s["device"] == "cuda" and s["mode"] == "bf16"),
                   default=None)
    ratio = (ray.get("ratio_to_local", {}).get("ray-local", {}) or {}).get("steady")
    return {
        "decode_core_s": {s["syntax"]: 1.0 / s["medsim_reduced_images_per_s"] for s in decode.get("summary", [])},
        "bytes_per_image": (decode.get("export", {}).get("bytes", 0) / decode["export"]["files"]
                            if decode.get("export", {}).get("files") else None),
        "decode_megapixels": max((s["megapixels_median"] for s in decode.get("summary", [])), default=None),
        "embed_core_s": {mode: threads / best[mode]["images_per_s"] for mode in ("int8", "channels_last")
                         if mode in best},
        "gpu_images_per_s": gpu_bf16, "gpu": gpu.get("device"),
        "ray_ratio": min(1.0, ratio or 1.0), "ray_ratio_measured": ratio,
        "sources": {"decode": decode.get("created_at"), "embed": embed.get("created_at"),
                    "gpu": gpu.get("created_at"), "ray": ray.get("created_at")},
    }


def table(hours: float, cores_per_node: int) -> str:
    i = inputs()
    seconds = hours * 3600
    r = i["ray_ratio"]
    lines = [f"Inputs: decode per syntax (CPU-core s/image, reduced read of "
             f"~{i['decode_megapixels']:.0f} MP radiographs, one thread); embed int8 {i['embed_core_s'].get('int8', float('nan')):.3f} and float32 channels-last "
             f"{i['embed_core_s'].get('channels_last', float('nan')):.3f} CPU-core s/image; one GPU "
             f"({i['gpu']}, bf16) {i['gpu_images_per_s']:.0f} images/s; Ray efficiency r = {r:.2f}"
             + (f" (measured {i['ray_ratio_measured']:.2f}, capped at 1)" if i["ray_ratio_measured"]
                else " (not measured)") + f". Target: {hours:g} h; "
             f"{cores_per_node}-core nodes.", ""]
    if i["bytes_per_image"]:
        lines += [f"Storage: {i['bytes_per_image'] / 2**20:.1f} MiB per image -> "
                  + ", ".join(f"10^{round(math.log10(n))} images: {n * i['bytes_per_image'] / 2**40:.1f} TiB, "
                              f"{n * i['bytes_per_image'] / seconds / 2**20:,.0f} MiB/s" for n in SIZES)
                  + " of reads from storage (the average over the export's seven syntaxes; uncompressed images are ~3x that).", ""]
    lines += [
             "| syntax | decode s | images | CPU only, int8: cores (nodes) | CPU only, float32: cores (nodes) "
             "| GPUs (bf16) | + decode cores (nodes) |",
             "|---|---|---|---|---|---|---|"]
    for syntax, d in i["decode_core_s"].items():
        for n in SIZES:
            cells = []
            for mode in ("int8", "channels_last"):
                cores = n * (d + i["embed_core_s"][mode]) / (seconds * r)
                cells.append(f"{math.ceil(cores):,} ({math.ceil(cores / cores_per_node):,})")
            gpus = math.ceil(n / (i["gpu_images_per_s"] * seconds))
            decode_cores = n * d / (seconds * r)
            lines.append(f"| {syntax} | {d:.3f} | 10^{round(math.log10(n))} | {cells[0]} | {cells[1]} | {gpus} | "
                         f"{math.ceil(decode_cores):,} ({math.ceil(decode_cores / cores_per_node):,}) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--cores-per-node", type=int, default=32)
    args = parser.parse_args()
    print(table(args.hours, args.cores_per_node))
    return 0


if __name__ == "__main__":
    sys.exit(main())
