"""Embed benchmark on a GPU (and on that machine's CPU), to go beside the CPU figures of benchmark 2.

Needs only torch and numpy (no MONAI, no data, no weights: VGG-16 with random weights, synthetic radiographs
scaled like the caffe preprocessing; speed does not depend on the weights). Writes $OUT/embed_gpu.json (or
benchmarks/results/embed_gpu.json); copy it into benchmarks/results/ and run `python -m benchmarks.report`.

    python benchmarks/bench_gpu.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import numpy as np
    import torch

    from medsim.model.embedder import Embedder, native_bf16
    from medsim.model.convert import synthetic_radiograph
    from medsim.model.network import build_network
    from medsim.preprocess import CAFFE_VGG16, PreparedImage

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--cpu-batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    flops = 2 * 15_346_630_656
    size = CAFFE_VGG16.image_size
    rows, cosine, gemm = [], {}, {}

    def network():
        net = build_network({"architecture": "vgg16", "layer": "conv5_3", "pooling": "gap"}, device="cpu")
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                torch.nn.init.zeros_(m.bias)
        return net

    weights = network().state_dict()
    base = np.stack([(synthetic_radiograph(size, seed=s)[None].repeat(3, 0) * 255 - 115).astype(np.float32)
                     for s in range(8)])

    def measure(device, mode, batch):
        net = network()
        net.load_state_dict(weights)
        embedder = Embedder(net, CAFFE_VGG16, device=device, batch_size=batch, mode=mode)
        x = PreparedImage(np.concatenate([base] * (batch // 8 + 1))[:batch], CAFFE_VGG16.fingerprint)
        embedder.embed_prepared(x)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < args.seconds or done < 2 * batch:
            embedder.embed_prepared(x)
            done += batch
        if device == "cuda":
            torch.cuda.synchronize()
        rate = done / (time.perf_counter() - started)
        rows.append({"device": device, "mode": mode, "batch": batch, "images_per_s": round(rate, 2),
                     "gflops": round(rate * flops / 1e9, 1)})
        print(rows[-1], flush=True)
        return embedder.embed_prepared(PreparedImage(base, CAFFE_VGG16.fingerprint))

    info = {"host_cpu": platform.processor(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "cpu_native_bf16": native_bf16("cpu")}
    try:
        info["host_cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
            torch.backends.cuda.matmul.allow_tf32 = False
            a @ a
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                a @ a
            torch.cuda.synchronize()
            gemm[name] = round(10 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12, 1)
        reference = None
        for mode in ("fp32", "channels_last", "bf16"):
            for batch in (1, 16, 64, 256):
                vectors = measure("cuda", mode, batch)
            reference = vectors if mode == "fp32" else reference
            cosine[f"cuda {mode}"] = round(float(np.min(np.sum(vectors * reference, axis=1))), 6)
    else:
        info["device"] = "none (no CUDA)"
    reference = None
    for mode in ("fp32", "channels_last", "bf16"):
        vectors = measure("cpu", mode, args.cpu_batch)
        reference = vectors if mode == "fp32" else reference
        cosine[f"cpu {mode}"] = round(float(np.min(np.sum(vectors * reference, axis=1))), 6)
    out = {"benchmark": "embed_gpu", "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info,
           "gemm_tflops": gemm, "speed": rows, "cosine_to_fp32": cosine,
           "note": "random VGG-16 weights and synthetic inputs: speed only; quality is benchmark 2's"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "embed_gpu.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out / 'embed_gpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
