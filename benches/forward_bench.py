#!/usr/bin/env python3
"""Benchmark (not a test): eval forward throughput of ckpt against PyTorch on this machine.

    cargo build --release
    ../ref-venv/bin/python benches/forward_bench.py [--models resnet18,resnet50] [--batch 32] [--images 64]

For each torchvision model (random weights, BN statistics as initialised), at 224 x 224 and the
given batch size, with the same number of threads for both (all cores): PyTorch's images/s
over `--images` images (after one warm-up batch), and ckpt's, from `ckpt logits` on the same
weights and inputs (ckpt reports its forward time without the loading). Prints a table.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision.models as tvm
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,efficientnet_b0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--ckpt", default=str(REPO / "target/release/ckpt"))
    args = ap.parse_args()
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-forward-bench-"))
    x = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    save_file({"input": x}, str(tmp / "input.safetensors"))
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(tvm, name)().eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / f"{name}.safetensors"))
        with torch.no_grad():
            model(x[: args.batch])
            t0 = time.perf_counter()
            for i in range(0, args.images, args.batch):
                model(x[i : i + args.batch])
            t_torch = time.perf_counter() - t0
        out = subprocess.run(
            [args.ckpt, "--threads", str(threads), "--device", "cpu", "logits", str(tmp / f"{name}.safetensors"),
             "--input", str(tmp / "input.safetensors"), "--batch-size", str(args.batch), "-o", str(tmp / f"{name}_logits.safetensors")],
            capture_output=True, text=True, check=True,
        )
        m = re.search(r"forward: (\d+) images in ([0-9.]+) s", out.stderr)
        t_ckpt = float(m.group(2))
        rows.append((name, args.images / t_torch, args.images / t_ckpt))
        print(f"  {name}: torch {args.images / t_torch:.2f} img/s, ckpt {args.images / t_ckpt:.2f} img/s", file=sys.stderr)
    print(f"\neval at 224, batch {args.batch}, {args.images} images, {threads} threads, torch {torch.__version__}")
    print(f"{'model':18} {'PyTorch img/s':>14} {'ckpt img/s':>11} {'ckpt / PyTorch':>15}")
    for name, a, b in rows:
        print(f"{name:18} {a:14.2f} {b:11.2f} {b / a:15.2f}")


if __name__ == "__main__":
    main()
