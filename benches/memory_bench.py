#!/usr/bin/env python3
"""Benchmark (not a test): peak resident memory and time of ckpt's forward jobs against PyTorch
doing the same job, optionally against a second (baseline) ckpt binary, run interleaved.

    cargo build --release
    ../ref-venv/bin/python benches/memory_bench.py [--models resnet50,efficientnet_b0]
        [--jobs eval,recal-bn,sweep-res] [--images 128] [--sweep-images 256]
        [--ckpt target/release/ckpt] [--base OLD_CKPT] [--repeat 1] [--no-torch]

Inputs: torchvision models with random weights (seed 0) saved as safetensors, and photo-sized
JPEGs cut from scikit-image's photographs (benches/data_bench.py's folder, made once in --dir)
linked into an ImageFolder of 10 classes (labels arbitrary: this measures memory and time).
Jobs, the same work on both sides, 2 threads for ckpt and 2 DataLoader workers for PyTorch
(`torch.set_num_threads` = the cores):

- eval: 224 px (Resize 256 + CenterCrop 224), batch 32, --images images; top-1.
- recal-bn: BN statistics re-estimated at 224, batch 64 (PyTorch: train mode, momentum=None,
  running statistics reset, no_grad), the state dict written.
- sweep-res: eval at 160, 192, 224, 256, 288, 320, batch 32, --sweep-images images (PyTorch:
  one DataLoader pass per size; ckpt decodes once).

Peak RSS is each process's own VmHWM (ckpt's `CKPT_REPORT_PEAK_RSS`; the PyTorch job reads its
own /proc/self/status), so PyTorch's DataLoader workers are not counted, only its main process.
Time is the whole process's wall time, start-up and model loading included. With --base, the
baseline binary and --ckpt run alternately, --repeat times each; the best time and the largest
peak of each are reported, and new/old ratios. The machine's load (other builds) moves the
times, not the peaks.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = [160, 192, 224, 256, 288, 320]

TORCH_JOB = r'''
import sys, time, torch, torchvision
from torch.utils.data import DataLoader
from torchvision import transforms as T
job, name, weights, folder, out = sys.argv[1:6]
torch.set_num_threads(int(sys.argv[6]))
from safetensors.torch import load_file
t0 = time.perf_counter()
model = getattr(torchvision.models, name)()
model.load_state_dict(load_file(weights))
norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
def loader(size, batch):
    t = T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size), T.ToTensor(), norm])
    return DataLoader(torchvision.datasets.ImageFolder(folder, t), batch_size=batch, num_workers=2)
if job == "recal-bn":
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats(); m.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in loader(224, 64):
            model(x)
    torch.save(model.state_dict(), out)
else:
    model.eval()
    for size in ([224] if job == "eval" else [160, 192, 224, 256, 288, 320]):
        right = n = 0
        with torch.no_grad():
            for x, y in loader(size, 32):
                right += (model(x).argmax(1) == y).sum().item(); n += len(y)
secs = time.perf_counter() - t0
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]
print(f"peak {hwm} kB, {secs:.2f} s")
'''


def ckpt_cmd(bin, job, weights, folder, out, threads):
    g = [bin, "-q", "--threads", str(threads)]
    if job == "eval":
        return g + ["eval", weights, "--data", folder, "--size", "224", "--batch-size", "32"]
    if job == "recal-bn":
        return g + ["recal-bn", weights, "--data", folder, "--batch-size", "64", "-o", out, "--force"]
    return g + ["sweep-res", weights, "--data", folder, "--sizes", ",".join(map(str, SIZES)), "--batch-size", "32"]


def run_ckpt(cmd):
    env = dict(os.environ, CKPT_REPORT_PEAK_RSS="1")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {r.stderr}")
    kb = int(re.search(r"peak resident memory (\d+) kB", r.stderr).group(1))
    cache = re.search(r"allocator cache (\d+) kB", r.stderr)
    return secs, kb * 1024, int(cache.group(1)) * 1024 if cache else None


def run_torch(py, job, name, weights, folder, out, threads):
    r = subprocess.run([py, "-c", TORCH_JOB, job, name, weights, folder, out, str(threads)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"torch {job} failed: {r.stderr}")
    m = re.search(r"peak (\d+) kB, ([0-9.]+) s", r.stdout)
    return float(m.group(2)), int(m.group(1)) * 1024


def folder_of(src, n, root):
    folder = root / f"val{n}"
    if folder.exists():
        return folder
    files = sorted(src.glob("*.jpg"))[:n]
    if len(files) < n:
        sys.exit(f"{src}: {len(files)} JPEGs, need {n}")
    for i, f in enumerate(files):
        d = folder / str(i % 10)
        d.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, d / f.name)
        except OSError:
            shutil.copy(f, d / f.name)
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,efficientnet_b0")
    ap.add_argument("--jobs", default="eval,recal-bn,sweep-res")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--sweep-images", type=int, default=256)
    ap.add_argument("--ckpt", default=str(REPO / "target/release/ckpt"))
    ap.add_argument("--base", help="a baseline ckpt binary, run alternately with --ckpt")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ckpt-data-bench/jpegs"))
    args = ap.parse_args()
    threads = os.cpu_count()
    sys.path.insert(0, str(REPO / "benches"))
    from data_bench import make_folder

    import torch
    import torchvision
    from safetensors.torch import save_file

    make_folder(args.dir, max(args.images, args.sweep_images, 500))
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-memory-bench-"))
    rows = []
    try:
        for name in args.models.split(","):
            torch.manual_seed(0)
            m = getattr(torchvision.models, name)()
            weights = str(tmp / f"{name}.safetensors")
            save_file({k: v.contiguous() for k, v in m.state_dict().items()}, weights)
            del m
            for job in args.jobs.split(","):
                n = args.sweep_images if job == "sweep-res" else args.images
                folder = str(folder_of(args.dir, n, tmp))
                for f in Path(folder).rglob("*.jpg"):
                    f.read_bytes()
                out = str(tmp / "out.safetensors")
                bins = [("new", args.ckpt)] + ([("old", args.base)] if args.base else [])
                res = {k: [] for k, _ in bins}
                for _ in range(args.repeat):
                    for k, b in bins:
                        res[k].append(run_ckpt(ckpt_cmd(b, job, weights, folder, out, threads)))
                        print(f"  {name} {job} {k}: {res[k][-1][0]:.1f} s, {res[k][-1][1] / 1e9:.2f} GB", file=sys.stderr, flush=True)
                tr = None
                if not args.no_torch:
                    tr = run_torch(sys.executable, job, name, weights, folder, str(tmp / "out.pt"), threads)
                    print(f"  {name} {job} torch: {tr[0]:.1f} s, {tr[1] / 1e9:.2f} GB", file=sys.stderr, flush=True)
                best = {k: (min(r[0] for r in v), max(r[1] for r in v), v[-1][2]) for k, v in res.items()}
                rows.append((name, job, n, best, tr))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{threads} threads / 2 DataLoader workers; torch {torch.__version__}; best of {args.repeat} "
          f"(time), largest (peak); peak RSS of the main process\n")
    head = "| model | job | images | ckpt s | ckpt peak GB | PyTorch s | PyTorch peak GB |"
    if args.base:
        head += " old ckpt s | old peak GB | new/old time |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, job, n, best, tr in rows:
        t, p, _ = best["new"]
        line = f"| {name} | {job} | {n} | {t:.1f} | {p / 1e9:.2f} | "
        line += f"{tr[0]:.1f} | {tr[1] / 1e9:.2f} |" if tr else "- | - |"
        if args.base:
            ot, op, _ = best["old"]
            line += f" {ot:.1f} | {op / 1e9:.2f} | {t / ot:.3f} |"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
