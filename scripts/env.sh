# Sourced by the scripts: where the venv, the cargo target dir and the
# binaries live. Override with RLHF_VENV / CARGO_TARGET_DIR.
RLHF_CACHE=${RLHF_CACHE:-$HOME/.cache/rlhfd}
# `. scripts/env.sh --cache`: keep the venv and cargo target under RLHF_CACHE
# (test.sh, demo.sh and CI reuse them across runs and clones).
if [ "${1:-}" = "--cache" ]; then
  RLHF_VENV=${RLHF_VENV:-$RLHF_CACHE/venv}
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$RLHF_CACHE/target}
fi
RLHF_VENV=${RLHF_VENV:-$PWD/.venv}
case "$RLHF_VENV" in /*) ;; *) RLHF_VENV="$PWD/$RLHF_VENV" ;; esac
export RLHF_VENV
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export LIBTORCH_USE_PYTORCH=1
export PATH="$RLHF_VENV/bin:$PATH"
RLHF_PY="$RLHF_VENV/bin/python"
RLHF_BIN="$CARGO_TARGET_DIR/release"
