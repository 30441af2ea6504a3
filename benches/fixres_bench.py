#!/usr/bin/env python3
"""Benchmark (not a test): `ckpt fixres` against the seed's PyTorch FixRes loop, same images,
same epochs, same machine, in the same command.

    cargo build --release        # or a dev build: the script takes target/release, else debug
    ../ref-venv/bin/python benches/fixres_bench.py                   # 256 images, 224, 3 epochs
    ../ref-venv/bin/python benches/fixres_bench.py --images 128 --rounds 1 --size 160

Makes, in a temporary folder (removed at the end): an ImageFolder of --images photo-sized
JPEGs in 8 classes (random crops of scikit-image's photographs, as benches/data_bench.py cuts
them: 300-640 px on the longer side, camera aspect ratios, JPEG quality 75-95), and a
torchvision ResNet-50 with random weights (torch.manual_seed(0)) saved as safetensors. Then,
--rounds times, interleaved (PyTorch, ckpt, PyTorch, ckpt, ...), each as its own process under
/usr/bin/time -v (wall seconds, peak resident memory):

  PyTorch, the seed's loop: torch.set_num_threads(--threads); model.eval(); layer4[2].bn3
    .train(); requires_grad False for all but fc; SGD(fc, lr 1e-3, momentum 0.9);
    cross-entropy; ImageFolder in folder order with the eval transform at S (Resize(floor(S /
    0.875)) + CenterCrop(S) + ToTensor + Normalize) through DataLoader(batch_size 64,
    shuffle=False, num_workers=--threads); --epochs epochs; the checkpoint saved at the end.
  ckpt: `ckpt fixres MODEL --data DIR --size S --epochs E --batch-size 64 --no-shuffle
    --threads T -o OUT` (the same recipe; by default it keeps the backbone's output in memory
    after the first epoch), and with --cache-mb 0 (the backbone run every epoch) for reference.

Reports each run, then the median per method and ratio = PyTorch seconds / ckpt seconds.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benches"))

TORCH_LOOP = r'''
import sys, time, torch, torchvision
from torch.utils.data import DataLoader
from torchvision import transforms as T
from safetensors.torch import load_file
model_path, data, size, epochs, threads, out = sys.argv[1:7]
size, epochs, threads = int(size), int(epochs), int(threads)
torch.set_num_threads(threads)
t0 = time.time()
model = torchvision.models.resnet50()
model.load_state_dict(load_file(model_path))
tf = T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size), T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
ds = torchvision.datasets.ImageFolder(data, transform=tf)
loader = DataLoader(ds, batch_size=64, shuffle=False, num_workers=threads)
for p in model.parameters():
    p.requires_grad = False
for p in model.fc.parameters():
    p.requires_grad = True
model.eval()
model.layer4[2].bn3.train()
opt = torch.optim.SGD(model.fc.parameters(), lr=1e-3, momentum=0.9)
crit = torch.nn.CrossEntropyLoss()
for epoch in range(epochs):
    for x, y in loader:
        loss = crit(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"epoch {epoch}: last loss {loss.item():.4f}", file=sys.stderr)
torch.save(model.state_dict(), out)
'''


def make_data(root, n):
    from data_bench import make_folder

    jpegs = root / "jpegs"
    make_folder(jpegs, n)
    data = root / "train"
    for i, f in enumerate(sorted(jpegs.glob("*.jpg"))):
        c = data / f"class_{i % 8}"
        c.mkdir(parents=True, exist_ok=True)
        os.link(f, c / f.name)
    return data


def make_model(path):
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = torchvision.models.resnet50()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))


def timed(cmd, env=None):
    """Runs cmd under /usr/bin/time -v: (seconds, peak RSS in MiB)."""
    t0 = time.time()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    secs = time.time() - t0
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    rss = next(
        int(line.split(":")[1]) for line in r.stderr.splitlines()
        if "Maximum resident set size" in line
    )
    return secs, rss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-uncached", action="store_true", help="skip the --cache-mb 0 runs")
    ap.add_argument("--ckpt", default=None)
    args = ap.parse_args()
    ckpt = args.ckpt or next(
        (str(p) for p in [REPO / "target/release/ckpt", REPO / "target/debug/ckpt"] if p.exists()),
        None,
    )
    if ckpt is None:
        sys.exit("no ckpt binary: cargo build --release first")
    import torch

    root = Path(tempfile.mkdtemp(prefix="ckpt-fixres-bench-"))
    try:
        data = make_data(root, args.images)
        model = root / "resnet50.safetensors"
        make_model(model)
        loop = root / "seed_loop.py"
        loop.write_text(TORCH_LOOP)
        subprocess.run(["cat", *map(str, data.rglob("*.jpg"))], stdout=subprocess.DEVNULL)
        torch_cmd = [sys.executable, str(loop), str(model), str(data), str(args.size),
                     str(args.epochs), str(args.threads), str(root / "torch.pt")]
        ckpt_cmd = [ckpt, "-q", "--threads", str(args.threads), "fixres", str(model),
                    "--data", str(data), "--size", str(args.size), "--epochs",
                    str(args.epochs), "--batch-size", "64", "--no-shuffle", "--force",
                    "-o", str(root / "ckpt.safetensors")]
        methods = [("PyTorch (seed loop)", torch_cmd), ("ckpt fixres", ckpt_cmd)]
        if not args.no_uncached:
            methods.append(("ckpt fixres --cache-mb 0", ckpt_cmd + ["--cache-mb", "0"]))
        print(f"{args.images} images, {args.size} px, {args.epochs} epochs, batch 64, "
              f"{args.threads} threads; ckpt = {ckpt}; torch {torch.__version__}")
        results = {name: [] for name, _ in methods}
        for r in range(args.rounds):
            for name, cmd in methods:
                secs, rss = timed(cmd)
                results[name].append((secs, rss))
                print(f"  round {r + 1}: {name:26} {secs:7.1f} s  peak RSS {rss:7.0f} MiB",
                      flush=True)
        base = statistics.median(s for s, _ in results[methods[0][0]])
        print()
        print("| method | seconds (median) | PyTorch / method | peak RSS MiB |")
        print("|---|---|---|---|")
        for name, _ in methods:
            secs = statistics.median(s for s, _ in results[name])
            rss = max(m for _, m in results[name])
            print(f"| {name} | {secs:.1f} | {base / secs:.2f} | {rss:.0f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
