#!/usr/bin/env python3
"""The effect of `ckpt distill` on the fixtures: README's distillation table, rerun.

    cargo build --release && python3 scripts/distill_effect.py      # from the repo root
    CKPT=path/to/ckpt SEEDS=0,1,2 EPOCHS=20 python3 scripts/distill_effect.py

Three weak students of the same teacher, the tiny digits ResNet after 10 epochs
(fixtures/tiny/epoch_10, 97 % top-1 on digits/val): the same ResNet after 1 epoch
(fixtures/tiny/epoch_1), and two of other families, a MobileNetV2 and a DenseNet trained briefly
on digits/train (fixtures/distill_cross, made by fixtures/make_distill_cross_fixtures.py). Each
student is fine-tuned on fixtures/digits/train (200 images) twice with everything the same but
the loss: cross-entropy only (`--alpha 0`) and the seed's CE + KD (T = 5); SGD momentum 0.9,
weight decay 1e-4, lr 0.01 with the cosine schedule, batch 64, the eval transform at 32 px (the
size the teacher was trained at), for each of EPOCHS (5 and 20) and each shuffle seed of SEEDS
(0 to 4: `--seed`, the only thing the seed changes with the eval transform). Then `ckpt eval` on
fixtures/digits/val (200 images, so one image is 0.5 %) gives top-1: the mean over the seeds, the
range, and in how many seeds CE + KD beat CE only. Python's standard library only; about two
minutes on two cores.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CKPT = os.environ.get("CKPT", str(ROOT / "target" / "release" / "ckpt"))
SEEDS = [int(s) for s in os.environ.get("SEEDS", ",".join(map(str, range(10)))).split(",")]
EPOCHS = [int(e) for e in os.environ.get("EPOCHS", "5,20").split(",")]
FIX = ROOT / "fixtures"
TEACHER = FIX / "tiny" / "epoch_10.safetensors"
STUDENTS = [
    ("ResNet, epoch 1 (same family)", FIX / "tiny" / "epoch_1.safetensors"),
    ("MobileNetV2 (width 0.25)", FIX / "distill_cross" / "mobilenet_v2.safetensors"),
    ("DenseNet (growth 8)", FIX / "distill_cross" / "densenet.safetensors"),
]
DIGITS = ["--size", "32", "--crop-pct", "1", "--mean", "0.5", "--std", "0.5"]


def ckpt(*args):
    r = subprocess.run([CKPT, "-q", *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{CKPT} {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r.stdout


def top1(model):
    return json.loads(ckpt("eval", model, "--data", FIX / "digits" / "val", *DIGITS, "--json"))["top1"]


def fine_tune(work, student, epochs, seed, alpha):
    out = Path(work) / f"{student.stem}_{epochs}_{seed}_{'ce' if alpha else 'kd'}.safetensors"
    extra = ["--alpha", "0"] if alpha else []
    ckpt("distill", student, "--teacher", TEACHER, "--data", FIX / "digits" / "train", *DIGITS,
         "--transform", "eval", "--epochs", epochs, "--lr", "0.01", "--seed", seed, *extra, "-o", out)
    return top1(out)


def summary(values):
    mean = sum(values) / len(values)
    return f"{mean:.1f} % ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else f"{mean:.1f} %"


def main():
    seeds = f"seeds {SEEDS[0]}-{SEEDS[-1]}" if len(SEEDS) > 1 else f"seed {SEEDS[0]}"
    print(f"top-1 on fixtures/digits/val; fine-tunes: mean over {seeds} (range)\n")
    print(f"| student (teacher: ResNet epoch 10, {top1(TEACHER):.1f} %) | before | fine-tune | CE only (`--alpha 0`) | CE + KD (T = 5) | KD better |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for name, student in STUDENTS:
            before = top1(student)
            for epochs in EPOCHS:
                ce = [fine_tune(work, student, epochs, s, True) for s in SEEDS]
                kd = [fine_tune(work, student, epochs, s, False) for s in SEEDS]
                wins = sum(k > c for k, c in zip(kd, ce))
                print(f"| {name} | {before:.1f} % | {epochs} epochs | {summary(ce)} | {summary(kd)} | {wins} of {len(SEEDS)} |", flush=True)


if __name__ == "__main__":
    main()
