#!/usr/bin/env python3
"""Helper of scripts/gpu-check.sh: makes its inputs and compares ckpt's outputs.

Runs on the GPU machine's python3 (PyTorch, torchvision, numpy, Pillow; no `safetensors`
package, so safetensors files are read and written here: an 8-byte little-endian header
length, a JSON header, then the raw tensor bytes). Each `cmp-*` command prints one line,
`RESULT<TAB>number<TAB>detail`, and exits 1 when the comparison fails, so that the shell script
records it without parsing anything else.

Tolerances (issue 10), with `ref` the CPU result and `got` the other device's:
- logits: max |got - ref| <= 1e-4 * max |ref| over the whole logits tensor (f32), and the
  top-1 class differs for at most one image;
- BN statistics: every element of every running_mean / running_var within
  1e-4 * |ref| + 1e-6 * max |ref of that tensor| (README's metric against PyTorch: relative,
  with a floor for channels whose mean is near zero); num_batches_tracked equal, and every
  other tensor byte-identical (recal-bn copies them);
- sweep-res: top-1 and top-5 of every (model, size, crop_pct) within one image.
"""

import argparse
import json
import math
import multiprocessing
import os
import re
import struct
import sys
import time

import numpy as np

DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64,
          "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}

LOGITS_TOL = 1e-4
BN_REL_TOL = 1e-4
BN_FLOOR = 1e-6


def read_safetensors(path):
    """Name -> (dtype string, shape, raw bytes), plus the metadata dict."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, t in header.items():
        s, e = t["data_offsets"]
        tensors[name] = (t["dtype"], t["shape"], data[8 + n + s:8 + n + e])
    return tensors, meta


def array(entry):
    dtype, shape, raw = entry
    if dtype == "BF16":
        u = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
        return u.view(np.float32).reshape(shape)
    return np.frombuffer(raw, DTYPES[dtype]).reshape(shape)


def write_safetensors(path, tensors):
    """tensors: name -> numpy array (C-contiguous)."""
    header, offset = {}, 0
    names = sorted(tensors)
    rev = {np.dtype(v): k for k, v in DTYPES.items()}
    for name in names:
        a = tensors[name]
        header[name] = {"dtype": rev[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- inputs

def synthetic_image(args):
    """One smooth, structured RGB image: a class-specific grating and palette over a gradient,
    a few soft blobs, a little noise. Deterministic in (seed, index)."""
    path, cls, index, seed = args
    rng = np.random.default_rng([seed, index])
    w, h = (int(v) for v in rng.integers(300, 501, size=2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x /= w
    y /= h
    angle = cls * math.pi / 10 + rng.normal(0, 0.1)
    freq = 3 + cls + rng.uniform(-0.5, 0.5)
    u = x * math.cos(angle) + y * math.sin(angle)
    grating = 0.5 + 0.5 * np.sin(2 * math.pi * freq * u + rng.uniform(0, 2 * math.pi))
    palette = np.array([(cls * 37 % 256), (cls * 91 % 256), (cls * 157 % 256)], np.float32)
    img = (0.3 + 0.4 * (x[..., None] * rng.uniform(0, 1, 3) + y[..., None] * rng.uniform(0, 1, 3))
           ) * 255
    img = 0.5 * img + 0.5 * grating[..., None] * palette
    for _ in range(int(rng.integers(2, 6))):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-120, 120, 3)
    img += rng.normal(0, 4, img.shape)
    from PIL import Image
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def cmd_images(a):
    t0 = time.time()
    jobs = []
    for i in range(a.count):
        cls = i % a.classes
        d = os.path.join(a.dir, f"class_{cls:02d}")
        os.makedirs(d, exist_ok=True)
        jobs.append((os.path.join(d, f"img_{i:05d}.jpg"), cls, i, a.seed))
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(synthetic_image, jobs, chunksize=16)
    size = sum(os.path.getsize(j[0]) for j in jobs)
    print(f"{a.count} JPEGs in {a.classes} classes, {size / 2**20:.0f} MiB, "
          f"in {time.time() - t0:.1f} s: {a.dir}")


def cmd_resnet50(a):
    import torch
    import torchvision
    torch.manual_seed(a.seed)
    model = torchvision.models.resnet50()
    torch.save(model.state_dict(), a.out)
    print(f"random-weight resnet50 (seed {a.seed}): {a.out}")


def cmd_inputs(a):
    """Normalised-looking N x 3 x S x S batches; each file is the first N of one seeded draw."""
    counts = [int(c) for c in a.counts.split(",")]
    rng = np.random.default_rng(a.seed)
    x = rng.standard_normal((max(counts), 3, a.size, a.size), dtype=np.float32)
    for n in counts:
        path = f"{a.prefix}_{n}.safetensors"
        write_safetensors(path, {"input": x[:n]})
        print(f"{path}: input [{n}, 3, {a.size}, {a.size}]")


# ----------------------------------------------------------------------------- comparisons

def verdict(ok, number, detail):
    print(f"{'PASS' if ok else 'FAIL'}\t{number}\t{detail}")
    return 0 if ok else 1


def compare_logits(ref_path, got_path):
    ref_t, _ = read_safetensors(ref_path)
    got_t, _ = read_safetensors(got_path)
    ref, got = array(ref_t["logits"]).astype(np.float64), array(got_t["logits"]).astype(np.float64)
    if ref.shape != got.shape:
        return False, "shape", f"logits shapes differ: {list(got.shape)} vs {list(ref.shape)}"
    if not np.isfinite(got).all():
        return False, "nan", f"{got_path}: non-finite logits"
    scale = np.abs(ref).max()
    rel = np.abs(got - ref).max() / scale if scale > 0 else np.abs(got - ref).max()
    flips = int((ref.argmax(1) != got.argmax(1)).sum())
    ok = rel <= LOGITS_TOL and flips <= 1
    return ok, f"{rel:.1e}", (f"max|d|/max|ref| {rel:.2e} (tol {LOGITS_TOL:g}), top-1 differs for "
                              f"{flips} of {ref.shape[0]} images, max|ref| {scale:.3g}")


def cmd_cmp_logits(a):
    ok, number, detail = compare_logits(a.ref, a.got)
    return verdict(ok, number, detail)


def compare_bn(ref_path, got_path):
    ref_t, _ = read_safetensors(ref_path)
    got_t, _ = read_safetensors(got_path)
    if set(ref_t) != set(got_t):
        return False, "keys", f"tensor names differ: {sorted(set(ref_t) ^ set(got_t))[:5]}"
    worst, worst_name, worst_scaled, layers, problems = 0.0, "", 0.0, 0, []
    for name in sorted(ref_t):
        r, g = ref_t[name], got_t[name]
        if r[:2] != g[:2]:
            problems.append(f"{name}: {g[0]} {g[1]} vs {r[0]} {r[1]}")
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("running_mean", "running_var"):
            layers += leaf == "running_mean"
            rv, gv = array(r).astype(np.float64), array(g).astype(np.float64)
            if not np.isfinite(gv).all():
                problems.append(f"{name}: non-finite")
                continue
            top = np.abs(rv).max()
            d = np.abs(gv - rv)
            tol = BN_REL_TOL * np.abs(rv) + BN_FLOOR * top
            if (d > tol).any():
                i = int(np.argmax(d - tol))
                problems.append(f"{name}[{i}]: {gv.flat[i]:.7g} vs {rv.flat[i]:.7g}")
            scaled = d.max() / top if top > 0 else d.max()
            if scaled >= worst_scaled:
                worst_scaled, worst_name = scaled, name
            worst = max(worst, float((d / np.maximum(tol, 1e-300)).max()))
        elif r[2] != g[2]:
            problems.append(f"{name}: differs (expected a byte-identical copy or the same count)")
    if layers == 0:
        problems.append("no running_mean tensors")
    detail = (f"{layers} BN layers; worst element at {worst:.2f} of its tolerance; "
              f"max|d|/max|ref| {worst_scaled:.2e} ({worst_name})")
    if problems:
        detail += f"; {len(problems)} failing, first: {problems[0]}"
    return not problems, f"{worst_scaled:.1e}", detail


def cmd_cmp_bn(a):
    ok, number, detail = compare_bn(a.ref, a.got)
    return verdict(ok, number, detail)


def compare_sweep(ref_path, got_path):
    def load(p):
        with open(p) as f:
            return {(r["model"], r["img_size"], r["crop_pct"]): r for r in json.load(f)}
    ref, got = load(ref_path), load(got_path)
    if set(ref) != set(got):
        return False, "points", "the two sweeps measured different points"
    worst, problems = 0, []
    for k, r in sorted(ref.items()):
        g = got[k]
        n = r["images"]
        if g["images"] != n:
            problems.append(f"{k}: {g['images']} images vs {n}")
            continue
        for field in ("top1", "top5"):
            diff = round(abs(g[field] - r[field]) * n / 100)
            worst = max(worst, diff)
            if diff > 1:
                problems.append(f"{k} {field}: {g[field]} vs {r[field]}")
    detail = f"{len(ref)} points; worst top-1/top-5 difference {worst} image(s) (tol 1)"
    if problems:
        detail += f"; first failing: {problems[0]}"
    return not problems, f"{worst} img", detail


def cmd_cmp_sweep(a):
    ok, number, detail = compare_sweep(a.ref, a.got)
    return verdict(ok, number, detail)


def cmd_selftest(a):
    """Perturb the CPU outputs just made and check that each comparison notices: so that a
    CPU-vs-CPU dry run, where everything is equal, still proves the comparisons can fail."""
    d = a.dir
    failures = []

    cases = []

    def expect(name, result, want):
        cases.append(name)
        if result[0] != want:
            failures.append(f"{name}: expected {'pass' if want else 'fail'}, got {result}")

    t, _ = read_safetensors(a.logits)
    x = array(t["logits"]).astype(np.float32)
    scale = np.abs(x).max()
    for factor, want in ((0.3, True), (3.0, False)):
        y = x.copy()
        y.flat[0] += factor * LOGITS_TOL * scale
        write_safetensors(f"{d}/perturbed_logits.safetensors", {"logits": y})
        expect(f"logits +{factor}x tol", compare_logits(a.logits, f"{d}/perturbed_logits.safetensors"), want)

    t, _ = read_safetensors(a.bn)
    names = sorted(t)
    var_name = next(n for n in names if n.endswith("running_var"))
    other = next(n for n in names if n.endswith(".weight"))
    for factor, want in ((0.5, True), (3.0, False)):
        arrays = {n: array(t[n]).copy() for n in names}
        v = arrays[var_name]
        v.flat[int(np.argmax(v))] *= 1 + factor * BN_REL_TOL
        write_safetensors(f"{d}/perturbed_bn.safetensors", arrays)
        expect(f"BN var *(1+{factor}e-4)", compare_bn(a.bn, f"{d}/perturbed_bn.safetensors"), want)
    arrays = {n: array(t[n]).copy() for n in names}
    arrays[other].flat[0] = np.nextafter(arrays[other].flat[0], np.float32(np.inf))
    write_safetensors(f"{d}/perturbed_bn.safetensors", arrays)
    expect("BN: a copied weight changed by 1 ulp", compare_bn(a.bn, f"{d}/perturbed_bn.safetensors"), False)

    with open(a.sweep) as f:
        records = json.load(f)
    for images, want in ((1, True), (2, False)):
        changed = [dict(r) for r in records]
        changed[0]["top1"] += images * 100 / changed[0]["images"]
        with open(f"{d}/perturbed_sweep.json", "w") as f:
            json.dump(changed, f)
        expect(f"sweep top-1 +{images} image", compare_sweep(a.sweep, f"{d}/perturbed_sweep.json"), want)

    if failures:
        return verdict(False, f"{len(failures)} wrong", "; ".join(failures))
    return verdict(True, f"{len(cases)} cases",
                   "each comparison passes just inside its tolerance and fails just outside")


# ----------------------------------------------------------------------------- timings

def forward_seconds(stderr_path):
    """ckpt logits' "forward: N images in X s (R images/s)" -> (N, N / R): more digits than X."""
    with open(stderr_path) as f:
        m = re.search(r"forward: (\d+) images in [\d.]+ s \(([\d.]+) images/s\)", f.read())
    if not m:
        raise SystemExit(f"{stderr_path}: no 'forward: N images in X s' line")
    n, rate = int(m.group(1)), float(m.group(2))
    return n, n / rate


def cmd_steady_rate(a):
    """Images/s between a one-batch run and a many-batch run: the first batch's one-off costs
    (CUDA context, cuBLAS handle, kernel loading) cancel out."""
    n1, t1 = forward_seconds(a.small)
    n2, t2 = forward_seconds(a.large)
    steady = (n2 - n1) / (t2 - t1) if t2 > t1 else float("nan")
    print(f"INFO\t{steady:.1f} img/s\tsteady (images {n1}->{n2}, forward {t1:.2f}->{t2:.2f} s); "
          f"whole run of {n2}: {n2 / t2:.1f} img/s")


def cmd_sweep_rate(a):
    with open(a.json) as f:
        records = json.load(f)
    points = len(records)
    images = records[0]["images"] if records else 0
    per_point = ", ".join(f"{r['img_size']}: {r['images_per_second']:.0f}" for r in records)
    print(f"INFO\t{images * points / a.seconds:.1f} img/s\t{images} images x {points} sizes in "
          f"{a.seconds:.1f} s wall; ckpt's forward images/s per size: {per_point}")


def cmd_sweep_images(a):
    """How many images a sweep over `sizes` at `rate` images/s (at 224) can take in `seconds`."""
    cost = sum((int(s) / 224) ** 2 for s in a.sizes.split(","))
    print(max(a.min, min(a.max, int(a.rate * a.seconds / cost))))


def cmd_find_libs(a):
    """Directories under this python's site-packages (NVIDIA's wheels, torch/lib) that hold the
    named shared libraries, for LD_LIBRARY_PATH."""
    import glob
    import site
    roots = [p for p in sys.path + site.getsitepackages() if os.path.isdir(p)]
    dirs = []
    for name in a.names:
        for root in roots:
            hits = (glob.glob(os.path.join(root, "nvidia", "*", "lib", name))
                    + glob.glob(os.path.join(root, "nvidia", "*", "*", "lib", name))
                    + glob.glob(os.path.join(root, "torch", "lib", name)))
            if hits:
                d = os.path.dirname(os.path.realpath(hits[0]))
                if d not in dirs:
                    dirs.append(d)
                break
    print(":".join(dirs))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("images"); s.add_argument("dir"); s.add_argument("count", type=int)
    s.add_argument("--classes", type=int, default=10); s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_images)
    s = sub.add_parser("resnet50"); s.add_argument("out"); s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_resnet50)
    s = sub.add_parser("inputs"); s.add_argument("prefix"); s.add_argument("size", type=int)
    s.add_argument("counts"); s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_inputs)
    for name, fn in (("cmp-logits", cmd_cmp_logits), ("cmp-bn", cmd_cmp_bn), ("cmp-sweep", cmd_cmp_sweep)):
        s = sub.add_parser(name); s.add_argument("ref"); s.add_argument("got"); s.set_defaults(fn=fn)
    s = sub.add_parser("selftest"); s.add_argument("dir"); s.add_argument("--logits", required=True)
    s.add_argument("--bn", required=True); s.add_argument("--sweep", required=True)
    s.set_defaults(fn=cmd_selftest)
    s = sub.add_parser("steady-rate"); s.add_argument("small"); s.add_argument("large")
    s.set_defaults(fn=cmd_steady_rate)
    s = sub.add_parser("sweep-rate"); s.add_argument("json"); s.add_argument("seconds", type=float)
    s.set_defaults(fn=cmd_sweep_rate)
    s = sub.add_parser("sweep-images"); s.add_argument("rate", type=float)
    s.add_argument("seconds", type=float); s.add_argument("sizes")
    s.add_argument("--min", type=int, default=64); s.add_argument("--max", type=int, required=True)
    s.set_defaults(fn=cmd_sweep_images)
    s = sub.add_parser("find-libs"); s.add_argument("names", nargs="+"); s.set_defaults(fn=cmd_find_libs)
    a = p.parse_args()
    sys.exit(a.fn(a) or 0)


if __name__ == "__main__":
    main()
