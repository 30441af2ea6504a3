#!/usr/bin/env python3
"""Benchmark (not a test): ckpt's image pipeline against a PyTorch DataLoader, and its fidelity.

    ../ref-venv/bin/python benches/data_bench.py                  # 500 JPEGs, 224, 2 threads
    ../ref-venv/bin/python benches/data_bench.py --images 200 --passes 1

Makes (once, cached in --dir) a folder of photo-sized JPEGs: random crops of scikit-image's
photographs, 300 to 640 pixels on the longer side in the aspect ratios cameras use, saved by
PIL at quality 75 to 95 with 4:2:0 chroma (as most photographs are). Then, each alone on the
machine, with the page cache warm:

  (a) ckpt: `cargo bench --bench data_pipeline` (release build), `ckpt::data::Loader` over the
      folder with --threads workers: decode + resize + centre crop + normalise into batches;
  (b) PyTorch: `DataLoader(num_workers=--threads, batch_size=...)` over the same files with
      torchvision's `pil_loader` and `Resize(floor(S / 0.875)) + CenterCrop(S) + ToTensor +
      Normalize`, the eval transform of torchvision's and timm's references.

Each is timed over whole passes (thread or worker start included, as a real eval pass pays it)
and the median pass is reported as images/s. Then the fidelity check: ckpt's 8-bit crops of every
image (`--dump-u8`) against torchvision's PIL crops, for bilinear and bicubic, as mean and max
absolute difference in levels (1/255) per image.
"""

import argparse
import io
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets.folder import pil_loader

REPO = Path(__file__).resolve().parent.parent
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
INTERP = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def make_folder(folder, n, seed=0):
    """n photo-sized JPEGs cut from scikit-image's photographs (deterministic)."""
    import skimage.data as sk

    done = folder / ".complete"
    if done.exists() and done.read_text() == str(n):
        return
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.jpg"):
        old.unlink()
    sources = [
        Image.fromarray(getattr(sk, name)()).convert("RGB")
        for name in [
            "astronaut",
            "coffee",
            "chelsea",
            "rocket",
            "hubble_deep_field",
            "immunohistochemistry",
            "retina",
            "colorwheel",
        ]
    ]
    rng = random.Random(seed)
    aspects = [4 / 3, 3 / 4, 3 / 2, 2 / 3, 1.0, 16 / 9]
    for i in range(n):
        src = rng.choice(sources)
        aspect = rng.choice(aspects)
        # a random crop of that aspect covering 40-100% of the source's width or height
        cw = src.width * rng.uniform(0.4, 1.0)
        ch = cw / aspect
        if ch > src.height:
            ch = src.height * rng.uniform(0.4, 1.0)
            cw = ch * aspect
        x = rng.uniform(0, src.width - cw)
        y = rng.uniform(0, src.height - ch)
        crop = src.crop((round(x), round(y), round(x + cw), round(y + ch)))
        longer = rng.randint(300, 640)
        scale = longer / max(crop.size)
        size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
        img = crop.resize(size, Image.LANCZOS)
        img.save(folder / f"img_{i:04d}.jpg", quality=rng.randint(75, 95))
    done.write_text(str(n))


def warm(folder):
    for f in sorted(folder.glob("*.jpg")):
        f.read_bytes()


def run_ckpt(folder, args, interpolation, passes, dump=None):
    cmd = [
        "cargo",
        "bench",
        "-q",
        "--bench",
        "data_pipeline",
        "--",
        str(folder),
        "--threads",
        str(args.threads),
        "--batch-size",
        str(args.batch_size),
        "--size",
        str(args.size),
        "--interpolation",
        interpolation,
        "--passes",
        str(passes),
    ]
    if dump:
        cmd += ["--dump-u8", str(dump)]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class Files(Dataset):
    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(pil_loader(str(self.files[i])))


def eval_transform(size, interpolation, tensor=True):
    steps = [T.Resize(math.floor(size / 0.875), interpolation=INTERP[interpolation]), T.CenterCrop(size)]
    if tensor:
        steps += [T.ToTensor(), T.Normalize(MEAN, STD)]
    return T.Compose(steps)


def run_torch(files, args, passes):
    ds = Files(files, eval_transform(args.size, "bilinear"))
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        n = 0
        loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.threads, shuffle=False)
        for batch in loader:
            n += batch.shape[0]
        rates.append(n / (time.perf_counter() - start))
    return sorted(rates)


def fidelity(files, args, folder, interpolation):
    dump = folder.parent / f"ckpt_u8_{interpolation}.bin"
    run_ckpt(folder, args, interpolation, passes=0, dump=dump)
    got = np.fromfile(dump, dtype=np.uint8).reshape(len(files), args.size, args.size, 3)
    t = eval_transform(args.size, interpolation, tensor=False)
    means, maxes = [], []
    for k, f in enumerate(files):
        want = np.asarray(t(pil_loader(str(f))), dtype=np.int16)
        d = np.abs(got[k].astype(np.int16) - want)
        means.append(float(d.mean()))
        maxes.append(int(d.max()))
    dump.unlink()
    return {
        "mean": statistics.fmean(means),
        "worst_image_mean": max(means),
        "max": max(maxes),
        "images_with_max_4_or_more": sum(m >= 4 for m in maxes),
        "max_histogram": {str(v): maxes.count(v) for v in sorted(set(maxes))},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ckpt-data-bench/jpegs"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="ckpt threads and DataLoader workers")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--no-fidelity", action="store_true")
    args = ap.parse_args()

    make_folder(args.dir, args.images)
    files = sorted(args.dir.glob("*.jpg"))
    sizes = [Image.open(f).size for f in files]
    total_mb = sum(f.stat().st_size for f in files) / 1e6
    print(
        f"{len(files)} JPEGs, {total_mb:.1f} MB, mean {statistics.fmean(w for w, _ in sizes):.0f}x"
        f"{statistics.fmean(h for _, h in sizes):.0f} px; {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}); transform {args.size}, bilinear, "
        f"batch {args.batch_size}, {args.threads} threads/workers",
        flush=True,
    )
    # Build first, so that compiling is not timed.
    subprocess.run(["cargo", "bench", "-q", "--bench", "data_pipeline", "--no-run"], cwd=REPO, check=True)
    warm(args.dir)

    ck = run_ckpt(args.dir, args, "bilinear", args.passes)
    warm(args.dir)
    tr = run_torch(files, args, args.passes)
    ck_rate, tr_rate = ck["median"], statistics.median(tr)
    print(f"ckpt::data Loader     {ck_rate:8.1f} images/s  (passes: {', '.join(f'{r:.0f}' for r in ck['rates'])})")
    print(f"torch DataLoader      {tr_rate:8.1f} images/s  (passes: {', '.join(f'{r:.0f}' for r in tr)})")
    print(f"ratio ckpt / torch    {ck_rate / tr_rate:8.2f}x")
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Pillow {Image.__version__}, Python {platform.python_version()}"
    )
    if not args.no_fidelity:
        for interp in INTERP:
            r = fidelity(files, args, args.dir, interp)
            print(
                f"fidelity {interp:8s} at {args.size}: mean {r['mean']:.3f} levels, worst image mean "
                f"{r['worst_image_mean']:.3f}, max {r['max']} ({r['images_with_max_4_or_more']} images "
                f"with max >= 4; per-image max histogram {r['max_histogram']})",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
