#!/usr/bin/env python3
"""Benchmark (not a test): `ckpt swa` against the I/O floor and against the PyTorch way.

    cargo build --release
    ../ref-venv/bin/python benches/swa_bench.py               # 8 x 100 M f32 params (3.2 GB)
    ../ref-venv/bin/python benches/swa_bench.py --params 10e6 # smaller

Makes N snapshot files (safetensors for ckpt and the floor, torch.save .pth for the PyTorch way),
warms the page cache, then measures in one run, each command alone on the machine:

  (a) floor: read every input byte once (cat > /dev/null) and write one output (cp of an input);
  (b) ckpt swa on the safetensors files (and on the .pth files);
  (c) timm's avg_checkpoints.py way: torch.load every file whole, sum in f64, divide, torch.save.

For each, wall time and peak anonymous memory (RssAnon from /proc/PID/status, sampled every
5 ms: mapped file pages belong to the page cache and are not counted). Prints a table and the
ratios the README quotes.
"""

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent


def layout(params):
    """A CNN-like mix of tensor sizes adding up to about `params` elements."""
    sizes = []
    big = int(params * 0.4)
    sizes.append(("head.weight", big))
    for i in range(4):
        sizes.append((f"stage{i}.conv.weight", int(params * 0.1)))
    rest = params - big - 4 * int(params * 0.1)
    n_small = 400
    for i in range(n_small):
        sizes.append((f"blocks.{i}.conv.weight", rest // n_small))
    for i in range(100):
        for b in ("weight", "bias", "running_mean", "running_var"):
            sizes.append((f"blocks.{i}.bn.{b}", 256))
    return sizes


def make_snapshots(folder, n, params):
    folder.mkdir(parents=True, exist_ok=True)
    spec = layout(params)
    g = torch.Generator().manual_seed(0)
    paths_st, paths_pt = [], []
    for k in range(n):
        sd = {name: torch.randn(size, generator=g) for name, size in spec}
        for i in range(100):
            sd[f"blocks.{i}.bn.num_batches_tracked"] = torch.tensor(1000 * (k + 1))
        st = folder / f"epoch_{k + 1}.safetensors"
        pt = folder / f"epoch_{k + 1}.pth"
        save_file(sd, str(st))
        torch.save(sd, pt)
        paths_st.append(st)
        paths_pt.append(pt)
        print(f"  made {st.name} and {pt.name}", file=sys.stderr)
    return paths_st, paths_pt


def rss_anon_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


REPEAT = 3


def measure(cmd, before=None, **kw):
    """Runs cmd REPEAT times (calling `before` first each time); returns the median seconds and
    the largest peak RssAnon in MiB over the process and its children."""
    runs = []
    for _ in range(REPEAT):
        if before:
            before()
        runs.append(measure_once(cmd, **kw))
    runs.sort()
    return runs[len(runs) // 2][0], max(m for _, m in runs)


def measure_once(cmd, **kw):
    """Runs cmd; returns (seconds, peak RssAnon in MiB over the process and its children)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, **kw)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            kids = []
            try:
                kids = [int(x) for x in open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()]
            except OSError:
                pass
            peak = max(peak, rss_anon_kb(p.pid) + sum(rss_anon_kb(c) for c in kids))
            time.sleep(0.005)

    th = threading.Thread(target=sample)
    th.start()
    rc = p.wait()
    dt = time.perf_counter() - t0
    done.set()
    th.join()
    if rc != 0:
        raise SystemExit(f"{cmd} failed with {rc}")
    return dt, peak / 1024


TORCH_WAY = r"""
import sys, torch
paths, out = sys.argv[1:-1], sys.argv[-1]
avg = {}
for p in paths:
    sd = torch.load(p, map_location="cpu", weights_only=True)
    for k, v in sd.items():
        if k in avg:
            avg[k] += v.double() if v.is_floating_point() else 0
        else:
            avg[k] = v.double() if v.is_floating_point() else v.clone()
    del sd
for k, v in avg.items():
    if v.is_floating_point():
        avg[k] = v.div_(len(paths)).float()
torch.save(avg, out)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--snapshots", type=int, default=8)
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--dir", default=os.environ.get("TMPDIR", "/tmp") + "/ckpt-swa-bench")
    ap.add_argument("--ckpt", default=str(REPO / "target/release/ckpt"))
    ap.add_argument("--keep", action="store_true", help="keep the snapshot files")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    folder = Path(args.dir)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"making {args.snapshots} snapshots of {args.params / 1e6:.0f} M f32 params in {folder}", file=sys.stderr)
    st, pt = make_snapshots(folder, args.snapshots, int(args.params))
    out = folder / "out"
    out.mkdir()
    for _ in range(2):
        subprocess.run(["cat", *map(str, st + pt)], stdout=subprocess.DEVNULL, check=True)
    size_in = sum(p.stat().st_size for p in st)

    rows = []
    # Every measurement starts with no dirty pages waiting to be written back, and no output.
    def settle():
        for f in out.glob("*"):
            f.unlink()
        subprocess.run(["sync"], check=True)

    t_cat, m_cat = measure(["cat", *map(str, st)], before=settle, stdout=subprocess.DEVNULL)
    t_cp, m_cp = measure(["cp", str(st[-1]), str(out / "floor.safetensors")], before=settle)
    rows.append(("floor: cat inputs + cp one", t_cat + t_cp, max(m_cat, m_cp)))
    # ckpt fsyncs its output before renaming it into place (a durable, atomic write); the
    # same floor with the copy made durable is the fair comparison for that part.
    t_cp2, _ = measure(["sh", "-c", f"cp {st[-1]} {out / 'floor2.safetensors'} && sync {out / 'floor2.safetensors'}"], before=settle)
    rows.append(("floor, durable: + fsync of copy", t_cat + t_cp2, max(m_cat, m_cp)))
    # ckpt records every input's sha256; its digest cache is emptied before each first run
    # (all inputs hashed) and warm for the reruns (the usual case of rerunning over snapshots).
    cache = folder / "digest-cache"
    env = dict(os.environ, CKPT_CACHE_DIR=str(cache))

    def cold():
        settle()
        shutil.rmtree(cache, ignore_errors=True)

    t_ck, m_ck = measure([args.ckpt, "-q", "swa", *map(str, st), "-o", str(out / "ckpt.safetensors")], before=cold, env=env)
    rows.append(("ckpt swa, first run (hashing)", t_ck, m_ck))
    t_re, m_re = measure([args.ckpt, "-q", "swa", *map(str, st), "-o", str(out / "ckpt2.safetensors")], before=settle, env=env)
    rows.append(("ckpt swa, digests cached", t_re, m_re))
    t2, m2 = measure([args.ckpt, "-q", "swa", *map(str, pt), "-o", str(out / "ckpt_pth.safetensors")], before=cold, env=env)
    rows.append(("ckpt swa, .pth inputs, first run", t2, m2))
    t_py, m_py = measure([sys.executable, "-c", TORCH_WAY, *map(str, pt), str(out / "torch.pth")], before=settle)
    rows.append(("torch.load + f64 sum (timm)", t_py, m_py))

    floor, durable = rows[0][1], rows[1][1]
    print(f"\n{args.snapshots} snapshots x {args.params / 1e6:.0f} M params = {size_in / 1e9:.2f} GB read, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, median of {REPEAT} runs")
    print(f"{'method':34} {'seconds':>8} {'GB/s':>6} {'x floor':>8} {'x durable':>9} {'peak anon MiB':>14}")
    for name, t, m in rows:
        print(f"{name:34} {t:8.2f} {size_in / t / 1e9:6.2f} {t / floor:8.2f} {t / durable:9.2f} {m:14.1f}")
    print(f"\nckpt vs floor: {t_ck / floor:.2f}x first run, {t_re / floor:.2f}x with cached digests "
          f"({t_ck / durable:.2f}x, {t_re / durable:.2f}x vs the durable floor; target <= 1.5x); "
          f"ckpt vs PyTorch: {t_py / t_ck:.1f}x / {t_py / t_re:.1f}x faster (target >= 8x); "
          f"ckpt peak anonymous memory {max(m_ck, m_re, m2):.1f} MiB (target <= 64)")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
