#!/usr/bin/env bash
# Install a CUDA 13.0 tool chain from NVIDIA's Python wheels into a venv and print the
# environment a `--features cuda` build needs:
#
#   eval "$(scripts/cuda-toolchain.sh)"          # enough for `cargo check --features cuda`
#   eval "$(scripts/cuda-toolchain.sh --link)"   # also the libraries `cargo build` links against
#
# The venv is $CKPT_CUDA_VENV, or ../cuda-venv next to the repository. Running it again
# installs nothing when the pinned versions are already there (a stamp file records them).
# Only `export` lines go to stdout; progress and errors go to stderr. Exit status 3 means the
# package index could not be reached (CI skips the CUDA check then); any other failure is 1.
#
# Why each variable (read in cudarc 0.19 build.rs and cudaforge 0.1, candle-kernels' builder):
#   PATH              cudarc runs `nvcc --version` to pick the CUDA version; cudaforge runs nvcc.
#   NVCC              cudaforge's first choice of compiler, so a system nvcc on PATH cannot win.
#   CUDA_HOME/PATH    cudarc's link search roots ($CUDA_HOME/lib); cudaforge's nvcc fallback.
#                     Headers need no variable: nvcc and cudaforge both use <nvcc>/../include.
#   CUDA_COMPUTE_CAP  the one GPU architecture to compile kernels for (90 = H100/H200); without
#                     it cudaforge asks nvidia-smi, which a build machine without a GPU lacks.
#   LIBRARY_PATH      (--link) the directory with unversioned libcublas.so etc. for `-lcublas`,
#                     and a link-time stub of libcuda (see below).
#   LD_LIBRARY_PATH   (--link) the wheels' libraries, for running tools built against them.
#
# libcuda is the driver and ships in no wheel. The link needs a libcuda.so that defines the
# driver API names; we build one from the wheel's own cuda.h (every `CUDAAPI` function and
# every versioned name cuda.h maps to), with soname libcuda.so.1, so the binary asks the
# loader for the real driver at run time. The stub is never put on LD_LIBRARY_PATH. NVIDIA's
# own stub (lib64/stubs/libcuda.so) comes only with the full toolkit, which is not on PyPI;
# with a toolkit installed, link against that instead. scripts/cuda-device-check.sh checks a
# build against a real driver.
set -euo pipefail

CUDA_CAP=${CUDA_COMPUTE_CAP:-90}
# CUDA 13.0 exactly: the GPU machines run nvcc 13.0 with driver 580.
COMPILE_PKGS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-nvvm==13.0.88
)
LINK_PKGS=(
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
)

link=false
case "${1:-}" in
  --link) link=true ;;
  "") ;;
  *)
    echo "usage: $0 [--link]" >&2
    exit 1
    ;;
esac

say() { echo "cuda-toolchain: $*" >&2; }

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${CKPT_CUDA_VENV:-$repo/../cuda-venv}
pkgs=("${COMPILE_PKGS[@]}")
if $link; then pkgs+=("${LINK_PKGS[@]}"); fi

# One installed requirement a line: a package is reinstalled only when its pin is not there.
stamp=$venv/.ckpt-cuda-packages
missing=()
for pkg in "${pkgs[@]}"; do
  if [[ ! -f $stamp ]] || ! grep -qxF "$pkg" "$stamp"; then missing+=("$pkg"); fi
done
if ((${#missing[@]} > 0)); then
  if [[ ! -x $venv/bin/python ]]; then
    say "creating venv $venv"
    python3 -m venv "$venv" >&2
  fi
  pip=("$venv/bin/python" -m pip --disable-pip-version-check)
  if ! "${pip[@]}" index versions nvidia-cuda-nvcc >/dev/null 2>&1; then
    say "the Python package index is unreachable: cannot install the CUDA tool chain"
    exit 3
  fi
  say "installing ${missing[*]} into $venv"
  "${pip[@]}" install -q --no-deps "${missing[@]}" >&2
  printf '%s\n' "${missing[@]}" >>"$stamp"
fi

venv=$(cd "$venv" && pwd)
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cuda=$site/nvidia/cu13
if [[ ! -x $cuda/bin/nvcc ]]; then
  say "no nvcc at $cuda/bin/nvcc after installing"
  exit 1
fi

echo "export PATH=\"$cuda/bin:\$PATH\""
echo "export NVCC=\"$cuda/bin/nvcc\""
echo "export CUDA_HOME=\"$cuda\""
echo "export CUDA_PATH=\"$cuda\""
echo "export CUDA_COMPUTE_CAP=$CUDA_CAP"

if $link; then
  linkdir=$venv/link
  mkdir -p "$linkdir"
  for lib in cudart cublas cublasLt curand nvrtc; do
    real=$(cd "$cuda/lib" && ls "lib$lib.so."* 2>/dev/null | grep -E "^lib$lib\.so\.[0-9]+$" | head -n 1)
    if [[ -z $real ]]; then
      say "no lib$lib.so.N in $cuda/lib"
      exit 1
    fi
    ln -sfn "$cuda/lib/$real" "$linkdir/lib$lib.so"
  done
  if [[ ! -f $linkdir/libcuda.so || $cuda/include/cuda.h -nt $linkdir/libcuda.so ]]; then
    say "building the link-time libcuda stub from $cuda/include/cuda.h"
    "$venv/bin/python" - "$cuda/include/cuda.h" >"$linkdir/libcuda-stub.c" <<'EOF'
import re, sys
header = open(sys.argv[1]).read()
names = set(re.findall(r"CUDAAPI\s+(cu\w+)\s*\(", header))
for m in re.finditer(r"#\s*define\s+cu\w+\s+(?:__CUDA_API_PT(DS|SZ)\()?(cu\w+)", header):
    names.add(m.group(2))
    if m.group(1):
        names.add(m.group(2) + "_pt" + m.group(1).lower())
print("/* Link-time stand-in for libcuda.so.1, generated from cuda.h; never loaded. */")
for name in sorted(names):
    print(f"int {name}(void) {{ return 999; }}")
EOF
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$linkdir/libcuda.so" "$linkdir/libcuda-stub.c"
  fi
  echo "export LIBRARY_PATH=\"$linkdir\${LIBRARY_PATH:+:\$LIBRARY_PATH}\""
  echo "export LD_LIBRARY_PATH=\"$cuda/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
fi
