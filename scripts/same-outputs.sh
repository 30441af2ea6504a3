#!/usr/bin/env bash
# Runs swa, ema (with and without --recal-bn), recal-bn (both estimators, a shard merge) and
# sweep-res (CSV and --save-best) on the shipped fixtures with two ckpt binaries, and compares
# every output byte for byte. For refactors that must not change behaviour:
#
#   scripts/same-outputs.sh OLD_BIN NEW_BIN
#
# Exits non-zero and names the files that differ. Provenance metadata records the command line,
# which is the same for both (each runs as `ckpt ...` from a copy of the binary named ckpt).
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2")
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
F=$root/fixtures
NORM=(--size 32 --crop-pct 1 --mean 0.5 --std 0.5)
run_all() {
    local bin=$1 out=$2
    mkdir -p "$out/bin" && cp "$bin" "$out/bin/ckpt"
    cd "$out"
    local ck="$out/bin/ckpt" q=-q
    $ck $q swa "$F"/tiny/epoch_*.safetensors -o swa.safetensors
    $ck $q swa "$F"/tiny/epoch_*.safetensors --weights 1,1,2,4 --dtype bf16 -o swa_bf16.safetensors
    $ck $q ema "$F"/tiny/epoch_*.safetensors --decay 0.5,0.9 -o 'ema_{decay}.safetensors'
    $ck $q swa "$F"/tiny/epoch_*.safetensors -o swa_bn.safetensors --recal-bn "$F/digits/train" "${NORM[@]}"
    $ck $q ema "$F"/tiny/epoch_*.safetensors --decay 0.5 -o ema_bn.safetensors --recal-bn "$F/digits/train" "${NORM[@]}" --estimator torch
    $ck $q recal-bn "$F/tiny/epoch_10.safetensors" --data "$F/digits/train" "${NORM[@]}" -o recal_pop.safetensors > /dev/null
    $ck $q recal-bn "$F/tiny/epoch_10.safetensors" --data "$F/digits/train" "${NORM[@]}" --estimator torch -o recal_torch.safetensors > /dev/null
    $ck $q recal-bn "$F/tiny/epoch_10.safetensors" --data "$F/digits/train" "${NORM[@]}" --shard 0/2 --stats-out part0.safetensors > /dev/null
    $ck $q recal-bn "$F/tiny/epoch_10.safetensors" --data "$F/digits/train" "${NORM[@]}" --shard 1/2 --stats-out part1.safetensors > /dev/null
    $ck $q recal-bn "$F/tiny/epoch_10.safetensors" --merge part0.safetensors part1.safetensors -o merged.safetensors > /dev/null
    $ck $q sweep-res "$F/tiny/epoch_10.safetensors" --data "$F/digits/val" --train-size 32 --mean 0.5 --std 0.5 \
        --sizes 24,32,40 --recal-bn "$F/digits/train" --csv sweep.csv --save-best best.safetensors > /dev/null
    rm -r bin
    cd - > /dev/null
}
run_all "$old" "$work/old"
run_all "$new" "$work/new"
status=0
for f in $(cd "$work/old" && ls); do
    if cmp -s "$work/old/$f" "$work/new/$f"; then echo "same     $f"; else echo "DIFFERS  $f"; status=1; fi
done
[ "$(cd "$work/old" && ls)" = "$(cd "$work/new" && ls)" ] || { echo "the two runs wrote different files"; status=1; }
exit $status
