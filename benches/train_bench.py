#!/usr/bin/env python3
"""Benchmark (not a test): training throughput of `ckpt distill` against PyTorch doing the same
steps, on this machine, in one run (issue 19's goal: >= 1.0x PyTorch's images/s).

    cargo build --release
    ../ref-venv/bin/python benches/train_bench.py                       # both pairs, 2 threads
    ../ref-venv/bin/python benches/train_bench.py --pairs resnet18:resnet18 --steps 2 --candle

Each pair is STUDENT:TEACHER (torchvision builders, random weights, torch.manual_seed(0)). One
training step, for both: the teacher's forward (eval mode, no gradient), the student's forward
in train mode, CE + KD loss (T = 5), backward, SGD (momentum 0.9, weight decay 1e-4); 224 px,
batch 32, --threads threads (torch.set_num_threads, `ckpt --threads`).

- PyTorch: --steps steps on random [32, 3, 224, 224] batches after one warm-up step, timed in
  process (no data loading: the images are already tensors).
- ckpt: `ckpt distill STUDENT --teacher TEACHER --data DIR --transform eval --no-shuffle
  --epochs 1 --batch-size 32 --max-images N` over an ImageFolder of photo-sized JPEGs (random
  crops of scikit-image's photographs, as benches/data_bench.py cuts them), run twice: with one
  step and with 1 + --steps steps; images/s = (--steps x 32) / the difference in wall time, so
  loading, the first step and writing the result cancel out. Decoding and resizing the images
  is included (a few ms per image, on the same threads).
- `--no-winograd`: also ckpt with `CKPT_WINOGRAD=0` (3x3 stride-1 convolutions and their input
  gradients on im2col + gemm instead of Winograd's F(2x2, 3x3)), same method.
- `--candle`: also ckpt with `--kernels candle` (student and teacher on candle's ops: the path
  before the train kernels), same method.

Prints a markdown table with the PyTorch version.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benches"))

BATCH, SIZE, T = 32, 224, 5.0


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


def torch_images_per_second(student, teacher, steps, threads):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    teacher.eval()
    student.train()
    decay = [p for p in student.parameters() if p.ndim > 1]
    no_decay = [p for p in student.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4},
                           {"params": no_decay, "weight_decay": 0.0}], lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(BATCH, 3, SIZE, SIZE, generator=g), torch.randint(0, 1000, (BATCH,), generator=g))
               for _ in range(steps + 1)]

    def step(x, y):
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        kd = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean") * T * T
        loss = F.cross_entropy(s, y) + kd
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(*batches[0])
    t0 = time.perf_counter()
    for x, y in batches[1:]:
        step(x, y)
    return steps * BATCH / (time.perf_counter() - t0)


def ckpt_seconds(ckpt, student, teacher, data, images, threads, out, kernels, winograd=True):
    cmd = [ckpt, "-q", "--threads", str(threads), "--kernels", kernels, "distill", str(student),
           "--teacher", str(teacher), "--data", str(data), "--transform", "eval", "--no-shuffle",
           "--epochs", "1", "--batch-size", str(BATCH), "--size", str(SIZE), "--max-images", str(images),
           "--force", "-o", str(out)]
    env = dict(os.environ)
    if not winograd:
        env["CKPT_WINOGRAD"] = "0"
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"ckpt failed: {' '.join(cmd)}\n{r.stderr}")
    return secs


def ckpt_images_per_second(ckpt, student, teacher, data, steps, threads, out, kernels, winograd=True):
    one = ckpt_seconds(ckpt, student, teacher, data, BATCH, threads, out, kernels, winograd)
    more = ckpt_seconds(ckpt, student, teacher, data, BATCH * (steps + 1), threads, out, kernels, winograd)
    return steps * BATCH / (more - one)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default="resnet18:resnet50,mobilenet_v2:resnet50",
                    help="STUDENT:TEACHER,... (torchvision builder names)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--candle", action="store_true", help="also time ckpt on candle's ops")
    ap.add_argument("--no-winograd", action="store_true",
                    help="also time ckpt with CKPT_WINOGRAD=0 (3x3 convolutions on im2col + gemm)")
    ap.add_argument("--ckpt", default=str(REPO / "target/release/ckpt"))
    args = ap.parse_args()
    import torch
    import torchvision.models as tvm
    from safetensors.torch import save_file

    root = Path(tempfile.mkdtemp(prefix="ckpt-train-bench-"))
    rows = []
    try:
        data = make_data(root, BATCH * (args.steps + 1))
        for pair in args.pairs.split(","):
            sname, tname = pair.split(":")
            models = {}
            for name in {sname, tname}:
                torch.manual_seed(0)
                models[name] = getattr(tvm, name)()
                save_file({k: v.contiguous() for k, v in models[name].state_dict().items()},
                          str(root / f"{name}.safetensors"))
            paths = (root / f"{sname}.safetensors", root / f"{tname}.safetensors")
            torch.manual_seed(0)
            student = getattr(tvm, sname)()
            student.load_state_dict(models[sname].state_dict())
            torch_ips = torch_images_per_second(student, models[tname], args.steps, args.threads)
            out = root / "out.safetensors"
            ckpt_ips = ckpt_images_per_second(args.ckpt, *paths, data, args.steps, args.threads, out, "fast")
            candle_ips = (ckpt_images_per_second(args.ckpt, *paths, data, args.steps, args.threads, out, "candle")
                          if args.candle else None)
            plain_ips = (ckpt_images_per_second(args.ckpt, *paths, data, args.steps, args.threads, out, "fast",
                                                winograd=False)
                         if args.no_winograd else None)
            rows.append((sname, tname, torch_ips, ckpt_ips, candle_ips, plain_ips))
            print(f"  {sname} <- {tname}: torch {torch_ips:.2f} img/s, ckpt {ckpt_ips:.2f} img/s"
                  + (f", ckpt on candle's ops {candle_ips:.2f} img/s" if candle_ips else "")
                  + (f", ckpt without Winograd {plain_ips:.2f} img/s" if plain_ips else ""), file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ndistillation step (teacher forward + student forward, backward, SGD) at {SIZE} px, batch {BATCH}, "
          f"{args.threads} threads, {args.steps} timed steps; torch {torch.__version__}\n")
    head = "| student | teacher | PyTorch img/s | ckpt img/s | ckpt / PyTorch |"
    if args.candle:
        head += " ckpt on candle's ops img/s | train kernels / candle's |"
    if args.no_winograd:
        head += " ckpt without Winograd img/s | Winograd's gain |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for s, t, a, b, c, w in rows:
        line = f"| {s} | {t} | {a:.2f} | {b:.2f} | {b / a:.2f} |"
        if c is not None:
            line += f" {c:.2f} | {b / c:.2f} |"
        if w is not None:
            line += f" {w:.2f} | {b / w:.2f} |"
        print(line)


if __name__ == "__main__":
    main()
