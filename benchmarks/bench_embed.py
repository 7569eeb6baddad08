"""Benchmark 2, embed: VGG-16 images/s at 224 px by batch size and numeric mode, beside the GEMM roofline, and the
retrieval quality (mAP@10 on the dev set, cosine to float32 per image) of each mode.

FLOP convention: one multiply-add counts as 2 FLOPs, for the model and for the GEMM alike (an n x n x n GEMM is
2 n^3 FLOPs). VGG-16 up to conv5_3 (medsim's embedding layer, the last max-pool and the classifier left out) at
224 px is 15.35 G multiply-adds = 30.7 GFLOP per image. Roofline (images/s) = measured GEMM FLOP/s / 30.7 GFLOP.

Modes (``medsim.model.embedder.EMBED_MODES`` plus two measured only here, compile and jit):
  fp32            float32, contiguous NCHW: the reference
  channels_last   float32, NHWC (oneDNN's preferred layout)
  bf16            bfloat16 autocast for the convolutions, pooling in float32 (native only with AVX512-BF16/AMX)
  compile         torch.compile (inductor, freezing) of the channels_last network; compile time reported (--full)
  jit             torch.jit.trace + freeze + optimize_for_inference (oneDNN conv+ReLU fusion, prepacked weights),
                  channels_last (--full)
  int8            the Embedder's int8 mode (medsim.model.quantize: torch.ao static quantisation, x86 backend,
                  per-channel weights, histogram-calibrated activations); a bundle without calibration images of its
                  own (the ImageNet one) is calibrated on the 16 sample PACS images, never on the dev set

Quality: every image of the dev set (../shared/data/cxr, 2,391 images) is embedded with fp32 and int8; bf16, whose
emulation is slow on CPUs without native bf16, on a subset drawn round-robin across sources (``--bf16-images``),
compared with fp32 on the same subset. channels_last (the default here) is scored in benchmark 3 from the vectors
that build-index wrote. mAP@10 follows `medsim evaluate` (docs/evaluation.md): leave-one-out, the query's own
patient excluded, relevant = shares a label. Vectors are cached in var/bench/vectors (git-ignored).

    python -m benchmarks.bench_embed [--quick | --full]
"""

from __future__ import annotations

import argparse
import hashlib
import time
import warnings

import numpy as np

from benchmarks.common import WORK, Timer, load_average, machine, say, shared_data, write_result

MODES = ("fp32", "channels_last", "bf16")  # Embedder modes that need nothing but the bundle


# ---- FLOPs and roofline --------------------------------------------------------------------------------------------


def conv_macs(features, size: int = 224) -> int:
    """Multiply-adds of the conv layers of ``features`` (a VGG ``nn.Sequential``) for one size x size image."""
    import torch

    macs, h, w = 0, size, size
    for module in features:
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            ph, pw = module.padding
            sh, sw = module.stride
            h = (h + 2 * ph - kh) // sh + 1
            w = (w + 2 * pw - kw) // sw + 1
            macs += h * w * module.out_channels * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, torch.nn.MaxPool2d):
            k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
            s = module.stride if isinstance(module.stride, int) else module.stride[0]
            h, w = (h - k) // s + 1, (w - k) // s + 1
    return macs


def gemm_rate(kind: str, n: int = 2048, min_seconds: float = 2.0) -> float:
    """Best-of GEMM throughput in FLOP/s (2 n^3 per product) with torch's CPU kernels (MKL / oneDNN)."""
    import torch

    if kind == "int8":
        a = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        b = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        op = torch._int_mm
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[kind]
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        op = torch.matmul
    op(a, b)
    best, started, reps = float("inf"), time.perf_counter(), 0
    while reps < 3 or time.perf_counter() - started < min_seconds:
        with Timer() as t:
            op(a, b)
        best, reps = min(best, t.seconds), reps + 1
        if reps >= 50:
            break
    return 2 * n ** 3 / best


# ---- inputs and modes ----------------------------------------------------------------------------------------------


def synthetic_batch(spec, n: int) -> np.ndarray:
    """(n, 3, S, S) prepared inputs from medsim's synthetic radiographs (speed does not depend on content)."""
    from medsim.model.convert import synthetic_radiograph
    from medsim.preprocess import prepare

    return np.stack([prepare(synthetic_radiograph(320, seed=i % 8), spec).array for i in range(n)])


def sample_calibration(spec):
    """An ``Int8Calibration`` from the sample PACS export's chest images (built from packages, never the dev set),
    for bundles that carry none of their own (the ImageNet bundle)."""
    import hashlib
    import json

    from benchmarks.bench_decode import sample_files
    from medsim.dicom import read_dicom
    from medsim.model.quantize import Int8Calibration, display_pixels
    from medsim.preprocess import prepare

    sample_files()
    from benchmarks.common import SAMPLE

    manifest = json.loads((SAMPLE / "manifest.json").read_text())
    arrays = []
    for row in manifest["files"]:
        if row["expected"] == "index":
            try:
                arrays.append(prepare(read_dicom(SAMPLE / row["path"]).pixels, spec).array)
            except Exception:  # noqa: BLE001 - a sample the reader refuses is simply not used for calibration
                continue
    pixels = display_pixels(np.stack(arrays), spec)
    return Int8Calibration(pixels=pixels, sha256=hashlib.sha256(pixels.tobytes()).hexdigest(), check={})


def make_runner(bundle, mode: str, calibration=None):
    """(function (N,3,S,S) float32 numpy -> (N, D) numpy, info dict) for one mode."""
    import torch

    from medsim.preprocess import PreparedImage

    if mode in MODES:
        embedder = bundle.embedder(mode=mode, batch_size=1 << 20)

        def run(x):
            return embedder.embed_prepared(PreparedImage(array=x, spec_fingerprint=embedder.spec_fingerprint))
        return run, {"describe": embedder.describe().replace(f"batch {embedder.batch_size}, ", "")}
    if mode == "compile":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        net = bundle.network().to(memory_format=torch.channels_last).eval()
        compiled = torch.compile(net)
        info = {}

        def run(x):
            with torch.inference_mode():
                t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
                return compiled(t).numpy()
        with Timer() as t:
            run(synthetic_batch(bundle.preprocess, 1))
        info["compile_seconds"] = round(t.seconds, 1)
        return run, info
    if mode == "jit":
        net = bundle.network().to(memory_format=torch.channels_last).eval()
        example = torch.from_numpy(synthetic_batch(bundle.preprocess, 1)).contiguous(memory_format=torch.channels_last)
        with Timer() as t, torch.no_grad():
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(net, example)))

        def run(x):
            with torch.inference_mode():
                return frozen(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()
        return run, {"freeze_seconds": round(t.seconds, 1)}
    if mode == "int8":  # the Embedder's int8 mode, with the bundle's calibration or the sample images'
        from medsim.model.embedder import Embedder

        calibration = calibration or bundle.int8_calibration() or sample_calibration(bundle.preprocess)
        with Timer() as t:
            embedder = Embedder(bundle.network(), bundle.preprocess, mode="int8", int8=calibration,
                                batch_size=1 << 20)

        def run(x):
            return embedder.embed_prepared(PreparedImage(array=x, spec_fingerprint=embedder.spec_fingerprint))
        return run, {"calibration_images": len(calibration.pixels), "calibration_or_cache_seconds": round(t.seconds, 1),
                     "describe": embedder.describe().replace(f"batch {embedder.batch_size}, ", "")}
    raise ValueError(mode)


def throughput(run, inputs: np.ndarray, batch: int, min_images: int, min_seconds: float) -> dict:
    """Images/s of ``run`` on batches of ``batch`` (one warm-up batch untimed)."""
    run(inputs[:batch])
    done, started = 0, time.perf_counter()
    while done < min_images or time.perf_counter() - started < min_seconds:
        start = done % max(1, len(inputs) - batch + 1)
        run(inputs[start:start + batch])
        done += batch
        if time.perf_counter() - started > 4 * min_seconds and done >= batch:
            break
    seconds = time.perf_counter() - started
    return {"batch": batch, "images": done, "seconds": round(seconds, 2), "images_per_s": round(done / seconds, 3)}


# ---- quality on the dev set ----------------------------------------------------------------------------------------


def load_dev_set(limit: int | None = None):
    from medsim.evaluate.data import load_eval_set

    cxr = shared_data() / "cxr"
    if not (cxr / "labels.csv").exists():
        return None
    return load_eval_set(cxr, cxr / "labels.csv", limit=limit)


def prepare_all(eval_set, spec, progress: bool = True) -> np.ndarray:
    """(N, 3, S, S) float32 model inputs of every image of ``eval_set`` (in memory; ~0.6 MB per image)."""
    from medsim.preprocess import prepare

    out = np.empty((len(eval_set), 3, spec.image_size, spec.image_size), dtype=np.float32)
    started = time.perf_counter()
    for i in range(len(eval_set)):
        out[i] = prepare(eval_set.pixels(i), spec).array
        if progress and (i + 1) % 500 == 0:
            say(f"  prepared {i + 1}/{len(eval_set)} images ({time.perf_counter() - started:.0f} s)")
    return out


def map_at_10(vectors: np.ndarray, eval_set) -> float:
    """mAP@10 as `medsim evaluate` computes it (leave-one-out, own patient excluded, relevance 'shares')."""
    from medsim.evaluate import metrics as M

    ids = np.arange(len(eval_set))
    scores = vectors @ vectors.T
    valid = ~M.exclusion_mask(ids, ids, eval_set.patients, eval_set.patients)
    relevant = M.relevance_matrix(eval_set.labels, eval_set.labels, "shares")
    top = M.rank_topk(scores, valid, 10)
    return M.mean_over_queries(M.ranking_metrics(top, relevant, valid, (10,))["mAP@10"])


def embed_cached(run, inputs: np.ndarray, key: str, batch: int = 16, refresh: bool = False) -> tuple[np.ndarray, dict]:
    """Vectors for ``inputs`` with ``run``, cached in var/bench/vectors/<key>.npy; also the embedding rate."""
    path = WORK / "vectors" / f"{key}.npy"
    if path.exists() and not refresh:
        return np.load(path), {"cached": True}
    out, started = [], time.perf_counter()
    for start in range(0, len(inputs), batch):
        out.append(run(inputs[start:start + batch]))
        if (start // batch) % 25 == 24:
            done = start + batch
            say(f"  {key}: {done}/{len(inputs)} ({done / (time.perf_counter() - started):.2f} images/s)")
    seconds = time.perf_counter() - started
    vectors = np.concatenate(out).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors, {"cached": False, "seconds": round(seconds, 1), "images_per_s": round(len(inputs) / seconds, 3)}


def cosine_stats(vectors: np.ndarray, reference: np.ndarray) -> dict:
    cos = np.sum(vectors * reference, axis=1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
    return {"min": round(float(cos.min()), 6), "p01": round(float(np.percentile(cos, 1)), 6),
            "mean": round(float(cos.mean()), 6), "share_below_0.999": round(float(np.mean(cos < 0.999)), 4)}


def set_key(eval_set, bundle, mode: str) -> str:
    digest = hashlib.sha256(f"{eval_set.fingerprint()}|{len(eval_set)}".encode()).hexdigest()[:12]
    return f"{bundle.fingerprint}-{digest}-{mode}"


# ---- the benchmark -------------------------------------------------------------------------------------------------


def run(quick: bool = False, full: bool = False, bf16_images: int | None = None, dev_limit: int | None = None,
        batches=None, modes=None) -> dict:
    import torch

    from medsim.model import resolve_bundle

    warnings.filterwarnings("ignore")
    load_before = load_average()
    bundle = resolve_bundle("imagenet")
    spec = bundle.preprocess
    macs = conv_macs(bundle.network().features, spec.image_size)
    flops = 2 * macs
    say(f"VGG-16 to conv5_3 at {spec.image_size} px: {macs / 1e9:.2f} G multiply-adds = {flops / 1e9:.2f} GFLOP")

    gemm_seconds = 0.5 if quick else 3.0
    gemm = {kind: gemm_rate(kind, 1024 if quick else 2048, gemm_seconds) for kind in ("fp32", "bf16", "int8")}
    say("GEMM " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in gemm.items()))
    roofline = {k: round(v / flops, 3) for k, v in gemm.items()}

    batches = batches or ((1, 4) if quick else (1, 4, 8, 16, 32))
    modes = modes or (("fp32", "channels_last", "bf16", "int8") if not full else
                      ("fp32", "channels_last", "bf16", "int8", "jit", "compile"))
    min_images, min_seconds = (4, 1.0) if quick else (32, 8.0)
    inputs = synthetic_batch(spec, max(batches) * 2)
    speed, mode_info = [], {}
    synthetic_reference = None  # fp32 vectors of 4 synthetic inputs: each mode's cosine to them is recorded
    calibration = sample_calibration(spec)
    for mode in modes:
        try:
            runner, info = make_runner(bundle, mode, calibration)
        except Exception as exc:  # e.g. torch.compile without a C++ compiler
            mode_info[mode] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            say(f"mode {mode} unavailable: {exc}")
            continue
        vectors = runner(inputs[:4])
        if mode == "fp32":
            synthetic_reference = vectors
        if synthetic_reference is not None:
            cosine = np.sum(vectors * synthetic_reference, axis=1)
            info["min_cosine_to_fp32_synthetic"] = round(float(np.min(cosine)), 6)
        mode_info[mode] = info
        for batch in batches:
            slow = mode == "bf16" and not machine()["native_bf16"]
            try:
                row = throughput(runner, inputs, batch, max(batch, min_images // (4 if slow else 1)),
                                 min_seconds / (2 if slow else 1))
            except Exception as exc:  # noqa: BLE001 - e.g. a compiled graph that fails on a new shape
                mode_info[mode][f"error_batch_{batch}"] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            row.update(mode=mode, gflops=round(row["images_per_s"] * flops / 1e9, 1),
                       load_average_1min=load_average()[0] if load_average() else None)
            speed.append(row)
            say(f"embed {mode:<14} batch {batch:>3}: {row['images_per_s']:.2f} images/s ({row['gflops']} GFLOP/s)")

    # GEMM again after the sweep: the roofline is the better of the two (other work on the machine lowers both)
    gemm_after = {kind: gemm_rate(kind, 1024 if quick else 2048, gemm_seconds) for kind in ("fp32", "bf16", "int8")}
    say("GEMM after the sweep " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in gemm_after.items()))
    gemm_before = dict(gemm)
    gemm = {k: max(gemm[k], gemm_after[k]) for k in gemm}
    roofline = {k: round(v / flops, 3) for k, v in gemm.items()}

    quality = {"available": False}
    eval_set = load_dev_set(dev_limit if dev_limit else (48 if quick else None))
    if eval_set is not None:
        quality = {"available": True, "images": len(eval_set),
                   "patients": len({p for p in eval_set.patients if p}), "notes": list(eval_set.notes)}
        say(f"quality: preparing {len(eval_set)} dev-set images")
        with Timer() as t:
            prepared = prepare_all(eval_set, spec)
        quality["prepare_seconds"] = round(t.seconds, 1)
        rows = {}
        runner, _ = make_runner(bundle, "fp32")
        reference, info = embed_cached(runner, prepared, set_key(eval_set, bundle, "fp32"))
        rows["fp32"] = {"images": len(eval_set), "mAP@10": map_at_10(reference, eval_set), **info}
        if "int8" in modes:
            runner, _ = make_runner(bundle, "int8", calibration)
            vectors, info = embed_cached(runner, prepared, set_key(eval_set, bundle, "int8"))
            rows["int8"] = {"images": len(eval_set), "mAP@10": map_at_10(vectors, eval_set),
                            "mAP@10_fp32_same_images": rows["fp32"]["mAP@10"],
                            "cosine_to_fp32": cosine_stats(vectors, reference), **info}
        n_bf16 = bf16_images or (16 if quick else 320)
        subset = load_dev_set(min(n_bf16, len(eval_set)))
        if subset is not None and "bf16" in modes:
            position = {item.rel_path: i for i, item in enumerate(eval_set.items)}
            rows_idx = np.asarray([position[item.rel_path] for item in subset.items if item.rel_path in position])
            if len(rows_idx) == len(subset):
                runner, _ = make_runner(bundle, "bf16")
                vectors, info = embed_cached(runner, prepared[rows_idx], set_key(subset, bundle, "bf16"))
                rows["bf16"] = {"images": len(subset), "mAP@10": map_at_10(vectors, subset),
                                "mAP@10_fp32_same_images": map_at_10(reference[rows_idx], subset),
                                "cosine_to_fp32": cosine_stats(vectors, reference[rows_idx]), **info,
                                "subset": "drawn round-robin across sources by a hash of the patient id "
                                          "(medsim.evaluate.data.load_eval_set(limit=N))"}
        for mode, row in rows.items():
            base = row.get("mAP@10_fp32_same_images", rows["fp32"]["mAP@10"])
            row["delta_vs_fp32"] = round(row["mAP@10"] - base, 5)
            row["within_0.005"] = abs(row["delta_vs_fp32"]) <= 0.005
            row["mAP@10"] = round(row["mAP@10"], 5)
            if "mAP@10_fp32_same_images" in row:
                row["mAP@10_fp32_same_images"] = round(row["mAP@10_fp32_same_images"], 5)
            say(f"quality {mode}: mAP@10 {row['mAP@10']:.4f} (delta vs fp32 {row['delta_vs_fp32']:+.4f}) on "
                f"{row['images']} images" + (f", cosine min {row['cosine_to_fp32']['min']}" if "cosine_to_fp32"
                                             in row else ""))
        quality["modes"] = rows
        quality["reference_vectors_key"] = set_key(eval_set, bundle, "fp32")

    best = {}
    for row in speed:
        if row["images_per_s"] > best.get(row["mode"], {}).get("images_per_s", 0):
            best[row["mode"]] = row
    return {
        "machine": machine(), "load_average_before": load_before, "load_average_after": load_average(),
        "model": {"bundle": bundle.name, "fingerprint": bundle.fingerprint, "image_size": spec.image_size,
                  "multiply_adds_per_image": macs, "gflop_per_image": round(flops / 1e9, 3),
                  "flop_convention": "1 multiply-add = 2 FLOP (for the GEMM too: 2 n^3 per n x n x n product)"},
        "gemm_gflops": {k: round(v / 1e9, 1) for k, v in gemm.items()},
        "gemm_gflops_before_after_sweep": {k: [round(gemm_before[k] / 1e9, 1), round(gemm_after[k] / 1e9, 1)]
                                           for k in gemm},
        "roofline_images_per_s": roofline,
        "torch_threads": torch.get_num_threads(),
        "default_mode": bundle.embedder().mode,
        "modes": mode_info, "speed": speed,
        "best_by_mode": {m: {"batch": r["batch"], "images_per_s": r["images_per_s"], "gflops": r["gflops"],
                             "share_of_fp32_roofline": round(r["images_per_s"] / roofline["fp32"], 3)}
                         for m, r in best.items()},
        "quality": quality,
        "settings": {"quick": quick, "full": full, "batches": list(batches), "min_images": min_images,
                     "min_seconds": min_seconds},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true", help="also torch.compile")
    parser.add_argument("--bf16-images", type=int, help="dev-set images embedded in bf16 (default 320)")
    parser.add_argument("--dev-limit", type=int, help="use only this many dev-set images (round-robin by source)")
    args = parser.parse_args(argv)
    path = write_result("embed", run(args.quick, args.full, args.bf16_images, args.dev_limit))
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
