#!/usr/bin/env bash
# Run on a GPU machine (driver installed, no Rust needed) to check a ckpt built here with
#   eval "$(scripts/cuda-toolchain.sh --link)" && cargo build --release --features cuda
# against the real driver: every libcuda symbol it imports is exported by libcuda.so.1 (the
# build linked against a stub generated from cuda.h), it runs on the GPU, its logits match the
# CPU's, and `--device auto` picks the GPU. Usage, from the repository root:
#   scripts/cuda-device-check.sh path/to/ckpt [OUTDIR]
set -uo pipefail
bin=${1:?usage: $0 path/to/ckpt [OUTDIR]}
out=${2:-$(mktemp -d)}
mkdir -p "$out"
model=fixtures/tiny/epoch_10.safetensors
input=fixtures/zoo/tiny_resnet_io.safetensors
fail=0

nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-/usr/local/cuda/lib64}
if ldd "$bin" | grep "not found"; then
  echo "FAIL: missing libraries (set LD_LIBRARY_PATH to the CUDA 13 libraries)"
  exit 1
fi

driver=$(ldd "$bin" | awk '/libcuda\.so\.1/{print $3}')
nm -D --undefined-only "$bin" | awk '{print $2}' | grep -E '^cu[A-Z]' | sort -u >"$out/imported.txt"
nm -D --defined-only "$driver" | awk '{print $3}' | sed 's/@.*//' | sort -u >"$out/driver.txt"
missing=$(comm -23 "$out/imported.txt" "$out/driver.txt")
echo "$(wc -l <"$out/imported.txt") driver symbols imported; missing from $driver: ${missing:-none}"
[[ -z $missing ]] || fail=1

export LD_BIND_NOW=1 # resolve every symbol at start, not on first call
for device in cuda cpu auto; do
  if ! "$bin" --device "$device" logits "$model" --input "$input" -o "$out/$device.safetensors" \
    2>"$out/$device.err"; then
    echo "FAIL: --device $device: $(cat "$out/$device.err")"
    fail=1
  fi
done
if grep -q "running on the CPU" "$out/auto.err"; then
  echo "FAIL: --device auto fell back to the CPU on a GPU machine"
  fail=1
fi
python3 - "$out" <<'PY' || fail=1
import array, json, struct, sys
def logits(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    meta = json.loads(b[8 : 8 + n])["logits"]
    s, e = meta["data_offsets"]
    return array.array("f", b[8 + n + s : 8 + n + e])
gpu, cpu = (logits(f"{sys.argv[1]}/{d}.safetensors") for d in ("cuda", "cpu"))
diff = max(abs(a - b) for a, b in zip(gpu, cpu))
print(f"max |cuda - cpu| logit difference: {diff:.2e}")
sys.exit(0 if diff < 1e-3 else 1)
PY
((fail == 0)) && echo "OK" || echo "FAIL"
exit "$fail"
