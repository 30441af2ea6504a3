#!/usr/bin/env bash
# Benchmark (not a test): one `ckpt soup` against the same steps run as separate commands
# (`recal-bn` + `eval` per candidate, `swa` + `recal-bn` + `eval` per candidate soup), on the
# same images, same machine, back to back.
#
#   cargo build --release && bash benches/soup_bench.sh [ARCH]
#   ARCH: a torchvision builder name (default mobilenet_v2); SIZE=224 VAL=128 RECAL=128
#   JPEGS=DIR (JPEGs in it or in its subfolders), CKPT=BINARY, DEVICE=cuda (default: ckpt's auto),
#   PYTHON=python3 (with torch, torchvision and safetensors)
#   ARCH=fixtures: the six candidates of fixtures/soup on the digits at 28 px (as tests/soup.rs)
#
# Six candidates of ARCH with 10 classes (torchvision's initialisation, seed 0, then each
# perturbed by 1 % Gaussian noise as if fine-tuned from one start; made with ../ref-venv) are
# judged greedily with --recal-bn on photo-sized JPEGs (benches/data_bench.py makes them; run it
# once first), VAL for validation and RECAL others for recalibration. The separate commands
# replay exactly the soup's steps from its JSON record (which candidates each soup held), with
# the same data options. The soup saves the decoding of every image after the first time (once
# per command otherwise: 2 decodes of RECAL + VAL per evaluation), the writing and reading of
# 1 + 2 files per evaluation, and process and model start-up; the forward passes are the same
# work either way, so the ratio grows with the share of decoding in a pass.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-mobilenet_v2}
size=${SIZE:-224}
nval=${VAL:-128}
nrecal=${RECAL:-128}
src=${JPEGS:-/tmp/ckpt-data-bench/jpegs}
py=${PYTHON:-../ref-venv/bin/python}
ckpt=("${CKPT:-target/release/ckpt}")
[ -n "${DEVICE:-}" ] && ckpt+=(--device "$DEVICE")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "$arch" = fixtures ]; then
  # The shipped fixtures: six tiny-ResNet candidates judged at 28 px on the digits, where
  # decoding and start-up are most of every command.
  mkdir -p "$work/val" && cp -r fixtures/digits/val/. "$work/val/"
  mkdir -p "$work/recal" && cp -r fixtures/digits/train/. "$work/recal/"
  k=0
  for c in fixtures/tiny/epoch_{1,2,5,10}.safetensors fixtures/soup/finetune_{a,b}.safetensors; do
    cp "$c" "$work/cand_$k.safetensors"; k=$((k + 1))
  done
  size=28
  extra=(--crop-pct 1 --mean 0.5 --std 0.5)
else
  extra=()
i=0
shopt -s nullglob
for f in "$src"/*.jpg "$src"/*/*.jpg; do
  if [ "$i" -lt "$nval" ]; then
    c=$((i % 10)); mkdir -p "$work/val/$c"; ln "$f" "$work/val/$c/" 2>/dev/null || cp "$f" "$work/val/$c/"
  elif [ "$i" -lt $((nval + nrecal)) ]; then
    mkdir -p "$work/recal"; ln "$f" "$work/recal/" 2>/dev/null || cp "$f" "$work/recal/"
  fi
  i=$((i + 1))
done
cat "$work"/val/*/*.jpg "$work"/recal/*.jpg > /dev/null

"$py" - "$arch" "$work" <<'PY'
import sys, torch, torchvision
try:
    from safetensors.torch import save_file
except ImportError:  # (the GPU machine's python3): PyTorch's own format, which ckpt reads too
    save_file = None
arch, work = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
base = torchvision.models.get_model(arch, num_classes=10).state_dict()
for k in range(6):
    g = torch.Generator().manual_seed(k + 1)
    sd = {n: (t + 0.01 * t.std().nan_to_num(0) * torch.randn(t.shape, generator=g) if t.is_floating_point() and t.numel() > 1 else t.clone()).contiguous() for n, t in base.items()}
    if save_file:
        save_file(sd, f"{work}/cand_{k}.safetensors")
    else:
        torch.save(sd, f"{work}/cand_{k}.pth")
PY
fi

data=(--size "$size" --batch-size 64 "${extra[@]}")
t0=$(date +%s.%N)
"${ckpt[@]}" -q soup "$work"/cand_* --data "$work/val" --recal-bn "$work/recal" \
  "${data[@]}" -o "$work/soup.safetensors" --json="$work/soup.json" > /dev/null
t1=$(date +%s.%N)

# The same steps as separate commands, replayed from the record.
"$py" - "$work/soup.json" > "$work/steps.txt" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for c in r["candidates"]:
    print(c["path"])
chosen = [r["steps"][0]["candidate"]]
for s in r["steps"][1:]:
    trial = chosen + [s["candidate"]]
    print(" ".join(trial))
    if s["kept"]:
        chosen = trial
PY
k=0
while read -r line; do
  # shellcheck disable=SC2086
  set -- $line
  if [ $# -gt 1 ]; then
    "${ckpt[@]}" -q swa --no-sort "$@" -o "$work/step_$k.safetensors" > /dev/null
    m="$work/step_$k.safetensors"
  else
    m=$1
  fi
  "${ckpt[@]}" -q recal-bn "$m" --data "$work/recal" "${data[@]}" -o "$work/step_${k}_bn.safetensors" > /dev/null
  "${ckpt[@]}" -q eval "$work/step_${k}_bn.safetensors" --data "$work/val" "${data[@]}" > /dev/null
  k=$((k + 1))
done < "$work/steps.txt"
t2=$(date +%s.%N)

"$py" - "$t0" "$t1" "$t2" "$arch" "$work/soup.json" "$k" <<'PY'
import json, sys
t0, t1, t2 = map(float, sys.argv[1:4])
r = json.load(open(sys.argv[5]))
soup, separate = t1 - t0, t2 - t1
print(f"{sys.argv[4]}, {r['images']['val']} val + {r['images']['recal']} recal images, "
      f"{r['evaluations']} evaluations (chose {len(r['chosen'])} of 6): "
      f"soup {soup:.1f} s, separate commands ({sys.argv[6]} x recal-bn + eval, with swa) {separate:.1f} s, "
      f"{separate / soup:.2f}x; soup decoded {r['decoded_images']} images")
PY
