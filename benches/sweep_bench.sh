#!/usr/bin/env bash
# Benchmark (not a test): one `ckpt sweep-res` over 6 sizes against 6 separate `ckpt eval` runs
# on the same folder, same machine, back to back.
#
#   cargo build --release && bash benches/sweep_bench.sh [MODEL] [JPEG_DIR]
#   SIZES=24,28,32,36,40,48 bash benches/sweep_bench.sh     # other sizes (default 160..320)
#
# A sweep saves decoding (each image is decoded once, not once per size) and start-up; the
# forward passes are the same work either way. So the ratio is far below 1 where decoding is a
# large share of an eval (small models or sizes, a GPU) and near 1 where the CPU's forward
# passes dominate (a ResNet-50 at 224 runs ~20 images/s here, decoding ~1200).
#
# JPEG_DIR defaults to the photo-sized JPEGs benches/data_bench.py makes (run it once first);
# they are hard-linked into an ImageFolder of 10 classes (labels are arbitrary: this measures
# time, not accuracy). MODEL defaults to the fixture ResNet, so that decoding dominates, which
# is what a sweep saves; a larger model shrinks the ratio towards the share of decoding.
#
# Peak RSS (each ckpt process's own VmHWM, `CKPT_REPORT_PEAK_RSS`) is printed for the sweep and
# the largest of the evals. With TORCHVISION=NAME (MODEL then a torchvision NAME's state dict,
# e.g. saved by benches/memory_bench.py), PyTorch's same sweep (a 2-worker DataLoader, one pass
# per size) is run too and its main process's peak printed next to ckpt's.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-fixtures/tiny/epoch_10.safetensors}
src=${2:-/tmp/ckpt-data-bench/jpegs}
ckpt=target/release/ckpt
folder=$(mktemp -d)/val
trap 'rm -rf "$(dirname "$folder")"' EXIT
i=0
for f in "$src"/*.jpg; do
  c=$((i % 10)); mkdir -p "$folder/$c"; ln "$f" "$folder/$c/" 2>/dev/null || cp "$f" "$folder/$c/"; i=$((i + 1))
done
cat "$folder"/*/*.jpg > /dev/null
sizes=${SIZES:-160,192,224,256,288,320}
peak() { sed -n 's/^ckpt: peak resident memory \([0-9]*\) kB$/\1/p' "$1" | sort -n | tail -1; }
log=$(dirname "$folder")/log
export CKPT_REPORT_PEAK_RSS=1
t0=$(date +%s.%N)
"$ckpt" -q sweep-res "$model" --data "$folder" --sizes $sizes 2> "$log.sweep" > /dev/null
t1=$(date +%s.%N)
for s in ${sizes//,/ }; do "$ckpt" -q eval "$model" --data "$folder" --size "$s" 2>> "$log.evals" > /dev/null; done
t2=$(date +%s.%N)
torch_kb=
if [ -n "${TORCHVISION:-}" ]; then
  py=${CKPT_REF_PYTHON:-../ref-venv/bin/python}
  torch_kb=$("$py" -c 'import sys; sys.path.insert(0, "benches"); import memory_bench as m; exec(m.TORCH_JOB)' \
    sweep-res "$TORCHVISION" "$model" "$folder" /dev/null "$(nproc)" | sed -n 's/^peak \([0-9]*\) kB.*/\1/p')
fi
python3 - "$t0" "$t1" "$t2" "$i" "$sizes" "$(peak "$log.sweep")" "$(peak "$log.evals")" "$torch_kb" <<'PY'
import sys
t0, t1, t2, n = map(float, sys.argv[1:5])
sweep, evals = t1 - t0, t2 - t1
print(f"{int(n)} images, sizes {sys.argv[5]}: sweep-res {sweep:.2f} s, 6 x eval {evals:.2f} s, ratio {sweep / evals:.2f}")
line = f"peak RSS: sweep-res {int(sys.argv[6]) / 1e6:.2f} GB, largest eval {int(sys.argv[7]) / 1e6:.2f} GB"
if sys.argv[8]:
    line += f", PyTorch sweep (main process) {int(sys.argv[8]) / 1e6:.2f} GB"
print(line)
PY
