#!/usr/bin/env bash
# Benchmark (not a test): forward time of two ckpt binaries on the same weights and input,
# alternated run by run, best of N each, as a ratio. For refactors that must not slow the
# forward pass down; both binaries run in the same command, so the machine's load hits both.
#
#   benches/ab_forward.sh OLD_BIN NEW_BIN [N]        (needs ../ref-venv with torch, torchvision)
#
# Models: random torchvision resnet18 and mobilenet_v2 (100 classes), one batch of 32 at 224.
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); n=${3:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
py=${CKPT_REF_PYTHON:-$root/../ref-venv/bin/python}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$py" - "$work" <<'PY'
import sys, torch, torchvision
from safetensors.torch import save_file
torch.manual_seed(0)
for name in ["resnet18", "mobilenet_v2"]:
    m = getattr(torchvision.models, name)(num_classes=100).eval()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{sys.argv[1]}/{name}.safetensors")
save_file({"input": torch.randn(32, 3, 224, 224)}, f"{sys.argv[1]}/input.safetensors")
PY
for model in resnet18 mobilenet_v2; do
  : > "$work/old.t"; : > "$work/new.t"
  for _ in $(seq "$n"); do
    for which in old new; do
      bin=${!which}
      "$bin" logits "$work/$model.safetensors" --input "$work/input.safetensors" \
          -o "$work/out.safetensors" --force 2>&1 \
        | sed -n 's/.*forward: [0-9]* images in \([0-9.]*\) s.*/\1/p' >> "$work/$which.t"
    done
  done
  o=$(sort -g "$work/old.t" | head -1); w=$(sort -g "$work/new.t" | head -1)
  echo "$model: old ${o} s, new ${w} s, new/old $(python3 -c "print(round($w / $o, 3))")"
done
