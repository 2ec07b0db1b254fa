#!/usr/bin/env bash
# Idempotent setup: a Python venv with torch 2.11.0 (libtorch for tch), then
# the release binaries. Needs only the Rust toolchain and python3.
#   RLHF_VENV         venv path (default .venv)
#   CARGO_TARGET_DIR  cargo target dir (default target/)
# The binaries carry an rpath to torch's lib dir: no LD_LIBRARY_PATH needed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

TORCH_VERSION=2.11.0
if ! "$RLHF_PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION into $RLHF_VENV" >&2
  python3 -m venv "$RLHF_VENV"
  "$RLHF_PY" -m pip install -q --upgrade pip >&2
  "$RLHF_PY" -m pip install -q "torch==$TORCH_VERSION" >&2
fi

echo "setup: building release binaries into $CARGO_TARGET_DIR" >&2
cargo build --release --workspace --bins >&2
echo "setup: ready: $RLHF_BIN/rlhf-worker" >&2
