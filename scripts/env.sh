# Sourced by the scripts: where the venv, the cargo target dir and the
# binaries live. Override with RLHF_VENV / CARGO_TARGET_DIR.
RLHF_CACHE=${RLHF_CACHE:-$HOME/.cache/rlhfd}
RLHF_VENV=${RLHF_VENV:-$PWD/.venv}
case "$RLHF_VENV" in /*) ;; *) RLHF_VENV="$PWD/$RLHF_VENV" ;; esac
export RLHF_VENV
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export LIBTORCH_USE_PYTORCH=1
export PATH="$RLHF_VENV/bin:$PATH"
RLHF_PY="$RLHF_VENV/bin/python"
RLHF_BIN="$CARGO_TARGET_DIR/release"
