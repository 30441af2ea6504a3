#!/usr/bin/env python3
"""Benchmark (not a test): eval forward throughput of ckpt against PyTorch on this machine.

    cargo build --release
    ../ref-venv/bin/python benches/forward_bench.py [--models resnet18,resnet50,...] [--batch 32]
        [--images 64] [--candle]

For each torchvision model (random weights, seeded; BN statistics as initialised), at 224 x 224
and the given batch size, with the same number of threads for both (all cores), in one run:

- PyTorch: images/s over `--images` images after one warm-up batch (torch.no_grad, eval); by
  default each model gets about 300 GFLOP of timed work, 96 to 480 images (a small model timed
  over 96 images is a fraction of a second of work, mostly noise).
- ckpt: `ckpt logits` on the same weights and inputs; ckpt prints the time of its forward passes
  (without loading). Steady state, as for PyTorch: the time for warm-up batch + `--images`
  images minus the time for the warm-up batch alone, from two runs.
- `--no-winograd`: also ckpt with `CKPT_WINOGRAD=0` (3x3 stride-1 convolutions on im2col + gemm
  instead of Winograd's F(2x2, 3x3)), same method.
- `--candle`: also ckpt with `CKPT_CPU_CONV=candle` (candle's own convolution, the path before
  issue 9), same method.
- GFLOP/s: 2 x the multiply-adds of every Conv2d and Linear (counted with forward hooks) per
  second, and that as a share of the machine's f32 peak, measured by
  `cargo bench --bench cpu_conv -- --peak` (FMA chains on every core).

- Peak RSS: ckpt's own VmHWM over the whole `logits` run (`CKPT_REPORT_PEAK_RSS`), and that of
  a separate PyTorch process doing the same job (load the weights and the input file, every
  batch forward), which reads its own /proc/self/status.

Prints a table (markdown) with the PyTorch version.
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
MAX_AUTO_IMAGES = 480
# The families of issue 15, one configuration each.
ZOO2 = ["vgg16_bn", "mobilenet_v3_small", "mobilenet_v3_large", "regnet_y_400mf", "regnet_x_1_6gf",
        "convnext_tiny", "densenet121", "efficientnet_v2_s", "shufflenet_v2_x1_0", "mnasnet1_0"]


def flops_per_image(model, x):
    macs = 0

    def hook(m, inp, out):
        nonlocal macs
        if isinstance(m, torch.nn.Conv2d):
            macs += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            macs += out.numel() * m.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x[:1])
    for h in hs:
        h.remove()
    return 2 * macs


TORCH_PEAK = r'''
import sys, torch, torchvision
from safetensors.torch import load_file
name, weights, inputs, batch, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
m = getattr(torchvision.models, name)().eval()
sd = __import__("collections").OrderedDict(load_file(weights))
if name.startswith("mnasnet"):
    sd._metadata = {"": {"version": 2}}  # MNASNet reads its version from the state dict
m.load_state_dict(sd)
x = load_file(inputs)["input"]
with torch.no_grad():
    for i in range(0, len(x), int(batch)):
        m(x[i : i + int(batch)])
print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
'''


def torch_peak_bytes(name, weights, inputs, batch, threads):
    r = subprocess.run([sys.executable, "-c", TORCH_PEAK, name, str(weights), str(inputs), str(batch), str(threads)],
                       capture_output=True, text=True, check=True)
    return int(r.stdout.split()[-1]) * 1024


def ckpt_forward_seconds(args, threads, weights, inputs, out, env, peaks=None):
    r = subprocess.run(
        [args.ckpt, "--threads", str(threads), "--device", "cpu", "logits", str(weights), "--input", str(inputs),
         "--batch-size", str(args.batch), "-o", str(out), "--force"],
        capture_output=True, text=True, env=env,
    )
    if r.returncode != 0:
        sys.exit(f"ckpt failed: {r.stderr}")
    if peaks is not None:
        peaks.append(int(re.search(r"peak resident memory (\d+) kB", r.stderr).group(1)) * 1024)
    return float(re.search(r"forward: (\d+) images in ([0-9.]+) s", r.stderr).group(2))


def ckpt_steady(args, threads, tmp, name, images, env, peaks=None):
    w = tmp / f"{name}.safetensors"
    t_all = ckpt_forward_seconds(args, threads, w, tmp / f"input_{images}.safetensors", tmp / "l.safetensors",
                                 dict(env, CKPT_REPORT_PEAK_RSS="1"), peaks)
    t_warm = ckpt_forward_seconds(args, threads, w, tmp / "input_warm.safetensors", tmp / "l.safetensors", env)
    return images / (t_all - t_warm)


def images_for(args, flops):
    """--images, or by default enough images for about 300 GFLOP of timed work (96 to 480): at
    96 images a 0.1-GFLOP model is 0.2 s of work, and the difference of two runs that short is
    mostly noise."""
    if args.images:
        return args.images
    batches = -(-300e9 // (flops * args.batch))
    return int(min(MAX_AUTO_IMAGES, max(96, batches * args.batch)))


def main():
    ap = argparse.ArgumentParser()
    # Issue 15's families: vgg16_bn, mobilenet_v3_small, mobilenet_v3_large, regnet_y_400mf,
    # regnet_x_1_6gf, convnext_tiny, densenet121, efficientnet_v2_s, shufflenet_v2_x1_0,
    # mnasnet1_0 (any torchvision builder name works; `--models zoo2` runs these, `--models all`
    # these and the four below).
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,efficientnet_b0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=None,
                    help="timed images per model (default: about 300 GFLOP of work, 96 to 480)")
    ap.add_argument("--candle", action="store_true", help="also time candle's own convolution path")
    ap.add_argument("--no-winograd", action="store_true", help="also time ckpt without Winograd's 3x3 kernel")
    ap.add_argument("--ckpt", default=str(REPO / "target/release/ckpt"))
    ap.add_argument("--peak", type=float,
                    help="the machine's f32 peak in GFLOP/s, instead of measuring it with cargo bench "
                         "(which builds the bench profile)")
    args = ap.parse_args()
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    peak = args.peak or float(subprocess.run(["cargo", "bench", "-q", "--bench", "cpu_conv", "--", "--peak"], cwd=REPO,
                                             capture_output=True, text=True, check=True).stdout.split()[-1])
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-forward-bench-"))
    x = torch.randn((args.images or MAX_AUTO_IMAGES) + args.batch, 3, 224, 224,
                    generator=torch.Generator().manual_seed(0))
    save_file({"input": x[: args.batch].contiguous()}, str(tmp / "input_warm.safetensors"))
    fast_env = {k: v for k, v in os.environ.items() if k != "CKPT_CPU_CONV"}
    candle_env = dict(fast_env, CKPT_CPU_CONV="candle")
    plain_env = dict(fast_env, CKPT_WINOGRAD="0")
    rows = []
    if args.models == "all":
        args.models = ",".join(["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"] + ZOO2)
    elif args.models == "zoo2":
        args.models = ",".join(ZOO2)
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(tvm, name)().eval()
        flops = flops_per_image(model, x)
        images = images_for(args, flops)
        inputs = tmp / f"input_{images}.safetensors"
        if not inputs.exists():
            save_file({"input": x[: images + args.batch].contiguous()}, str(inputs))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / f"{name}.safetensors"))
        with torch.no_grad():
            model(x[: args.batch])
            t0 = time.perf_counter()
            for i in range(args.batch, args.batch + images, args.batch):
                model(x[i : i + args.batch])
            torch_ips = images / (time.perf_counter() - t0)
        peaks = []
        ckpt_ips = ckpt_steady(args, threads, tmp, name, images, fast_env, peaks)
        candle_ips = ckpt_steady(args, threads, tmp, name, images, candle_env) if args.candle else None
        plain_ips = ckpt_steady(args, threads, tmp, name, images, plain_env) if args.no_winograd else None
        torch_rss = torch_peak_bytes(name, tmp / f"{name}.safetensors", inputs, args.batch, threads)
        rows.append((name, flops, images, torch_ips, ckpt_ips, candle_ips, plain_ips, peaks[0], torch_rss))
        print(f"  {name}: {images} images, torch {torch_ips:.2f} img/s, ckpt {ckpt_ips:.2f} img/s", file=sys.stderr)
    counts = args.images or "96-480 (about 300 GFLOP a model)"
    print(f"\neval at 224, batch {args.batch}, {counts} images after a warm-up batch, {threads} threads, "
          f"f32; torch {torch.__version__}; machine f32 peak {peak:.0f} GFLOP/s (measured)\n")
    head = ("| model | GFLOP/image | images | PyTorch img/s | ckpt img/s | ckpt / PyTorch | ckpt GFLOP/s | % of peak |"
            " PyTorch peak RSS GB | ckpt peak RSS GB |")
    if args.candle:
        head += " candle conv img/s | ckpt / candle |"
    if args.no_winograd:
        head += " ckpt without Winograd img/s | Winograd's gain |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, flops, images, a, b, c, w, rss, torch_rss in rows:
        line = (f"| {name} | {flops / 1e9:.2f} | {images} | {a:.1f} | {b:.1f} | {b / a:.2f} | {b * flops / 1e9:.0f} |"
                f" {100 * b * flops / 1e9 / peak:.0f} % | {torch_rss / 1e9:.2f} | {rss / 1e9:.2f} |")
        if c is not None:
            line += f" {c:.1f} | {b / c:.2f} |"
        if w is not None:
            line += f" {w:.1f} | {b / w:.2f} |"
        print(line)


if __name__ == "__main__":
    main()
