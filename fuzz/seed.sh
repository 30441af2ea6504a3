#!/bin/sh
# Seeds each target's corpus from the repository's fixtures (run from fuzz/).
set -e
f=../fixtures
mkdir -p corpus/safetensors_header corpus/sharded_index corpus/pth corpus/pickle
cp $f/tiny/*.safetensors $f/tiny/sharded_epoch_5/*.safetensors corpus/safetensors_header/
for s in $f/tiny/bf16/*.safetensors; do cp "$s" "corpus/safetensors_header/bf16_$(basename "$s")"; done
cp $f/tiny/sharded_epoch_5/model.safetensors.index.json corpus/sharded_index/
cp $f/tiny/epoch_10.pth $f/tiny/train_epoch_10.pth.tar $f/bad/*.pth corpus/pth/
# The data.pkl inside each archive seeds the pickle targets.
python3 - <<'PY'
import glob, os, zipfile
for f in ["../fixtures/tiny/epoch_10.pth", "../fixtures/tiny/train_epoch_10.pth.tar"] + glob.glob("../fixtures/bad/*.pth"):
    with zipfile.ZipFile(f) as z:
        for n in z.namelist():
            if n.endswith("data.pkl"):
                for d in ("pickle", "pth"):
                    with open(f"corpus/{d}/{os.path.basename(f)}.data.pkl", "wb") as out:
                        out.write(z.read(n))
PY
