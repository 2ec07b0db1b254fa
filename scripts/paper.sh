#!/usr/bin/env bash
# The paper's experiment on real weights, one command: Qwen2.5-Coder-0.5B
# (../shared/tools/get-qwen2.5-0.5b.sh) on the four FewCLUE tasks and the
# Chinese preference pairs of ../shared/data (read in place, never copied):
#   SFT with LoRA, SSF, RepAdapter (and full fine-tuning, --preset full) on the four tasks'
#   train_few_all together (dev_few_all picks the best method)
#   → reward model on the preference pairs, then further on FewCLUE pairs in
#     the paper's three multiple-choice formats
#   → PPO from the best SFT model (KL to it), one-token responses (nt = 1),
#     scored by that reward model; and the same PPO with the verifiable
#     label reward, to tell the reward model's part from PPO's
#   → eval of base, every SFT model and the PPO model on test_public, choice
#     and generate modes, the paper's settings
# through a local cluster (coordinator + one worker), then the report
# (Tables 3–5, curves) and a cross-check of base and the LoRA SFT model with
# transformers + peft.
#
# Usage: scripts/paper.sh [--preset cpu|full] [--out DIR] [--no-crosscheck] [--job-only] [--dry-run]
#                         [--only STAGE,... --sft ADAPTER_DIR] [--variants]
#   --variants the other RLHF algorithms as rows of Table 5 too (on by default
#              in the full preset): DPO on the multiple-choice pairs, GRPO with
#              the label reward and with the learned reward model
#   --only     keep only these stages (e.g. reward-mc,ppo-s1,eval), with --sft:
#              the SFT adapter (an earlier run's stages/sft-*/adapter) merged
#              into the base in place of the SFT stages' best
#   --dry-run  write the job file, check it as the coordinator will (fields,
#              names, paths, placement on this preset's workers), print the
#              plan with estimated minutes; fetch, build and start nothing
#   cpu   fits this 2-core machine in well under 100 minutes (bf16, subsets)
#   full  all of test_public and dev, more steps: for a GPU
# Resumable: the job file and the cluster's data dir stay in DIR; a rerun
# resubmits under the same request id, so an interrupted job is requeued and
# its finished stages (and checkpoints) are kept; a job that failed is
# resumed in its own directory with `rlhf-worker run`.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=cpu
OUT=
CROSSCHECK=1
JOB_ONLY=0
DRY_RUN=0
ONLY=
SFT_ADAPTER=
VARIANTS=
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-crosscheck) CROSSCHECK=0; shift ;;
    --job-only) JOB_ONLY=1; shift ;;
    --dry-run) DRY_RUN=1; JOB_ONLY=1; shift ;;
    --only) ONLY=$2; shift 2 ;;
    --sft) SFT_ADAPTER=$2; shift 2 ;;
    --variants) VARIANTS=1; shift ;;
    -h|--help) sed -n '2,/^set /{/^set /d;p}' "$0"; exit 0 ;;
    *) echo "paper.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-runs/paper-$PRESET}
. scripts/env.sh --cache
# The code this run's binaries are built from (taken now: HEAD may move while it runs).
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && COMMIT="$COMMIT+uncommitted"
if [ "$JOB_ONLY" = 0 ]; then
  ./scripts/setup.sh
  ./scripts/setup-bench.sh >/dev/null   # transformers + peft for the cross-check
elif [ ! -x "$RLHF_BIN/rlhfctl" ]; then
  ./scripts/setup.sh   # the job file is checked by rlhfctl
fi
SHARED=$(cd .. && pwd)/shared
DATA=$SHARED/data
[ -d "$DATA/fewclue" ] || { echo "paper.sh: $DATA/fewclue not found" >&2; exit 1; }
if [ "$DRY_RUN" = 1 ]; then
  # Where get-qwen2.5-0.5b.sh puts it; not fetched by a dry run.
  MODEL=$HOME/.cache/rlhfd/models/qwen2.5-coder-0.5b
  [ -f "$MODEL/model.safetensors" ] || echo "paper.sh: dry run: $MODEL is not there yet (a real run fetches it, ~2 min)"
else
  MODEL=$("$SHARED/tools/get-qwen2.5-0.5b.sh" | tail -n 1)
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Steps, batch sizes and subsets per preset (printed below). dtype auto:
# bf16 on a GPU or an AMX CPU, else f32 (`rlhf-worker dtype` says which).
# MC_N / MC_EVAL_N: examples per task whose multiple-choice pairs (every
# wrong option, three formats) train / pick and test the reward model;
# RM_PREF_STEPS > 0 first trains it on the Chinese preference pairs.
case "$PRESET" in
  cpu)
    DTYPE=auto SFT_STEPS=40 SFT_BATCH=8 SFT_N=160 DEV_N=24
    RM_PREF_STEPS=0 RM_PREF_BATCH=4 PAIR_TOKENS=256
    RM_MC_STEPS=48 RM_MC_BATCH=4 RM_LR=1e-4 RM_HEAD_LR=5e-3 RM_EVAL_EVERY=12 MC_N=160 MC_EVAL_N=16
    PPO_ITERS=8 PPO_PROMPTS=16 PPO_SAMPLES=16 PPO_MB_PROMPTS=4 PPO_EPOCHS=1 PPO_N=256 SEEDS="1 2 3"
    PPO_LR=3e-5 PPO_KL=1.0
    DPO_STEPS=16 DPO_BATCH=8 VARIANTS=${VARIANTS:-0}
    TEST_N=100 CKPT=0 WORKERS="--cpu-workers 1" WORKER_NAMES=cpu-0
    # Full fine-tuning is left to the full preset: f32 does not fit beside
    # the pipeline on 24 GiB, and in bf16 without AMX a step took 85-95 s
    # here (one run, 2026-12-04, cargo builds sharing the cores): 40 steps
    # would be an hour of the budget.
    METHODS="lora ssf repadapter" ;;
  full)
    DTYPE=auto SFT_STEPS=600 SFT_BATCH=16 SFT_N=0 DEV_N=0
    RM_PREF_STEPS=300 RM_PREF_BATCH=8 PAIR_TOKENS=1024
    RM_MC_STEPS=600 RM_MC_BATCH=16 RM_LR=1e-4 RM_HEAD_LR=5e-3 RM_EVAL_EVERY=50 MC_N=0 MC_EVAL_N=64
    PPO_ITERS=200 PPO_PROMPTS=64 PPO_SAMPLES=8 PPO_MB_PROMPTS=8 PPO_EPOCHS=2 PPO_N=0 SEEDS="1 2 3"
    PPO_LR=3e-5 PPO_KL=1.0
    DPO_STEPS=300 DPO_BATCH=16 VARIANTS=${VARIANTS:-1}
    TEST_N=0 CKPT=100 WORKERS="" WORKER_NAMES=gpu-0 METHODS="lora ssf repadapter full" ;;
  *) echo "paper.sh: --preset must be cpu or full, got $PRESET" >&2; exit 2 ;;
esac
limit() { [ "$2" -gt 0 ] && printf '%s = %s, ' "$1" "$2" || true; }
sources() { # FILE_TRAIN FILE_EVAL [FILE_TEST]: the four tasks as [[data.sources]] entries
  local sep=""
  printf 'sources = ['
  for t in eprstmt tnews ocnli bustm; do
    printf '%s{ task = "%s", train = "%s/fewclue/%s/%s.json"' "$sep" "$t" "$DATA" "$t" "$1"
    [ -n "$2" ] && printf ', eval = "%s/fewclue/%s/%s.json"' "$DATA" "$t" "$2"
    [ -n "${3:-}" ] && printf ', test = "%s/fewclue/%s/%s.json"' "$DATA" "$t" "$3"
    printf ' }'
    sep=", "
  done
  printf ']'
}
JOB=$OUT/paper-$PRESET.toml
{
cat <<EOF
# Generated by scripts/paper.sh --preset $PRESET. Runs as is with
#   rlhfctl submit $JOB --wait   or   rlhf-worker run $JOB --out DIR
version = 1
kind = "pipeline"
# Qwen2.5-Coder-0.5B on FewCLUE: PEFT SFT → reward model → PPO
name = "paper-$PRESET"
seed = 1

[model]
path = "$MODEL"
dtype = "$DTYPE"
max_length = 2048

[peft]
method = "lora"
r = 8
alpha = 16
target_modules = ["all-linear"]

[checkpoint]
every = $CKPT
keep = 1

EOF
for m in $METHODS; do
  case $m in
    lora) peft='{ method = "lora", r = 8, alpha = 16, target_modules = ["all-linear"] }' lr=2e-4 ;;
    ssf) peft='{ method = "ssf" }' lr=2e-3 ;;
    repadapter) peft='{ method = "repadapter", r = 8, alpha = 16, groups = 2 }' lr=5e-4 ;;
    full) peft='{ method = "full" }' lr=2e-5 ;;
  esac
  cat <<EOF
[[stage]]
name = "sft-$m"
kind = "sft"
peft = $peft
data = { $(limit max_examples $SFT_N)$(limit max_eval_examples $DEV_N)$(sources train_few_all dev_few_all) }
train = { max_steps = $SFT_STEPS, batch_size = $SFT_BATCH, lr = $lr, warmup_steps = $(( SFT_STEPS / 10 )) }

EOF
done
if [ "$RM_PREF_STEPS" -gt 0 ]; then
  cat <<EOF
[[stage]]
name = "reward-prefs"
kind = "reward"
data = { max_pair_tokens = $PAIR_TOKENS, sources = [{ train = "$DATA/medicalgpt_dpo_zh_500/dpo_zh_500.jsonl" }, { train = "$DATA/llamafactory_dpo_zh_demo/dpo_zh_demo.json" }] }
train = { max_steps = $RM_PREF_STEPS, batch_size = $RM_PREF_BATCH, lr = 2e-4, warmup_steps = $(( RM_PREF_STEPS / 10 )) }

EOF
  INIT='init_from = "reward-prefs"'
else
  INIT=""
fi
# The reward model on the multiple-choice pairs of the four tasks' training
# files: every example against every wrong option, in the paper's three
# formats (balanced over tasks and formats); dev pairs are scored every half
# of the steps, pairs from a stride of test_public once at the end. Its score
# adds c · log p(answer | prompt) under its own LM (score_logprob), which over
# the SFT base starts it at the SFT policy's ranking of the options instead
# of a random head's (a fresh head stayed at chance: 45.7% on test pairs).
# bare_pairs adds a fourth format, the bare correct answer ≻ each bare wrong
# one: what PPO's one-token answers are. Without it the reward model scored
# the wrong letters PPO sampled above the correct ones (at the first
# iteration: 1.52 vs -0.24) and PPO learned the wrong answers.
# The state kept is the one with the best dev pair accuracy (select_best):
# one run's dev accuracy went 72.8% at step 8 to 48.4% at step 16.
cat <<EOF
[[stage]]
name = "reward-mc"
kind = "reward"
$INIT
data = { from_multiple_choice = true, bare_pairs = true, $(limit max_examples $MC_N)$(limit max_eval_examples $MC_EVAL_N)$(sources train_few_all dev_few_all test_public) }
train = { max_steps = $RM_MC_STEPS, batch_size = $RM_MC_BATCH, lr = $RM_LR, head_lr = $RM_HEAD_LR, score_logprob = true, select_best = true, warmup_steps = $(( RM_MC_STEPS / 10 )), eval_every = $RM_EVAL_EVERY }

EOF
# PPO from the best SFT model (merged under it: the reference), one stage
# per seed, scored by the reward model; then the label-reward control. The
# policy adapter is LoRA, so transformers + peft can cross-check a PPO model.
# Each prompt is sampled PPO_SAMPLES times (samples_per_prompt): the copies
# share the prompt's forward, so 16 one-token answers per prompt cost about
# what one did (measured: 8 iterations of 16 prompts took 428 s with one
# sample each, 434 s with 16), and the gradient of a task's answer bias is
# no longer the noise of 4 samples (with 16 samples in all per iteration,
# PPO with the label reward drove OCNLI and BUSTM to one answer each).
# group_baseline: each score minus its prompt's mean over the samples. The
# reward model's scores differ by task more than by answer (one run, the
# first iteration: sampled correct answers -0.11, wrong 0.69, the wrong ones
# mostly TNEWS's), and with a critic that has seen none of an iteration's
# prompts those offsets became advantages that pushed every answer a task
# already favoured.
# kl_coef 1.0: the KL-regularised optimum is the reference times
# exp(reward / kl_coef), so a task's answer bias can move by at most the
# reward gap in nats; at 0.2 (a factor e^5) PPO with the label reward moved
# OCNLI and BUSTM toward one answer (OCNLI 43 -> 32-37, BUSTM 68 -> 49-60 in
# two runs over one SFT model, lr 1e-4 and 3e-5, 2026-12-05).
RL="iterations = $PPO_ITERS, ppo_epochs = $PPO_EPOCHS, max_new_tokens = 1, temperature = 1.0, top_p = 1.0, lr = $PPO_LR, critic_lr = 1e-4, kl_coef = $PPO_KL"
PPO="$RL, rollout_batch = $(( PPO_PROMPTS * PPO_SAMPLES )), minibatch = $(( PPO_MB_PROMPTS * PPO_SAMPLES )), samples_per_prompt = $PPO_SAMPLES, group_baseline = true"
# GRPO samples as PPO does (PPO_PROMPTS prompts x PPO_SAMPLES completions,
# a group per prompt), so its rows differ from PPO's only by the algorithm.
GRPO_RL="$RL, rollout_batch = $(( PPO_PROMPTS * PPO_SAMPLES )), minibatch = $(( PPO_MB_PROMPTS * PPO_SAMPLES ))"
for seed in $SEEDS; do
  cat <<EOF
[[stage]]
name = "ppo-s$seed"
kind = "ppo"
seed = $seed
peft = { method = "lora", r = 8, alpha = 16, target_modules = ["all-linear"] }
data = { $(limit max_examples $PPO_N)$(sources train_few_all "") }
ppo = { $PPO, score_with_eos = true, reward = { kind = "model" } }

EOF
done
if [ "$VARIANTS" = 1 ]; then
  cat <<EOF
# The other RLHF algorithms on the same SFT model (merged: the reference):
# DPO on the reward model's multiple-choice pairs (no reward model, no
# sampling), GRPO (the group of a prompt's PPO_SAMPLES completions as the
# baseline, no critic; beta 0.04 as DeepSeekMath's GRPO, a KL anchor to the
# SFT model) with the label reward and with the learned reward model.
[[stage]]
name = "dpo-mc"
kind = "dpo"
peft = { method = "lora", r = 8, alpha = 16, target_modules = ["all-linear"] }
data = { from_multiple_choice = true, $(limit max_examples $MC_N)$(limit max_eval_examples $MC_EVAL_N)$(sources train_few_all dev_few_all) }
dpo = { beta = 0.1 }
train = { max_steps = $DPO_STEPS, batch_size = $DPO_BATCH, lr = 1e-4, select_best = true, warmup_steps = $(( DPO_STEPS / 10 )), eval_every = $(( DPO_STEPS / 4 )) }

[[stage]]
name = "grpo-label"
kind = "grpo"
peft = { method = "lora", r = 8, alpha = 16, target_modules = ["all-linear"] }
data = { $(limit max_examples $PPO_N)$(sources train_few_all "") }
ppo = { $GRPO_RL, reward = { kind = "label" } }
grpo = { num_generations = $PPO_SAMPLES, beta = 0.04 }

[[stage]]
name = "grpo-rm"
kind = "grpo"
peft = { method = "lora", r = 8, alpha = 16, target_modules = ["all-linear"] }
data = { $(limit max_examples $PPO_N)$(sources train_few_all "") }
ppo = { $GRPO_RL, score_with_eos = true, reward = { kind = "model" } }
grpo = { num_generations = $PPO_SAMPLES, beta = 0.04 }

EOF
fi
cat <<EOF
# The same PPO with the verifiable reward (1 for the correct letter, else 0)
# in place of the reward model: whether PPO itself can add accuracy here.
[[stage]]
name = "ppo-label"
kind = "ppo"
peft = { method = "lora", r = 8, alpha = 16, target_modules = ["all-linear"] }
data = { $(limit max_examples $PPO_N)$(sources train_few_all "") }
ppo = { $PPO, reward = { kind = "label" } }

[[stage]]
name = "eval"
kind = "eval"
eval = { modes = ["choice", "generate"], max_new_tokens = 1, num_beams = 1, top_p = 0.9, temperature = 0.1, batch_size = 8, $(limit max_examples $TEST_N)tasks = [
EOF
for t in eprstmt tnews ocnli bustm; do
  printf '  { task = "%s", path = "%s/fewclue/%s/test_public.json" },\n' "$t" "$DATA" "$t"
done
echo '] }'
} > "$JOB"
if [ -n "$ONLY" ]; then
  # A part of the experiment over an earlier run's SFT model.
  [ -f "${SFT_ADAPTER:-}/adapter_config.json" ] || { echo "paper.sh: --only needs --sft ADAPTER_DIR (with adapter_config.json)" >&2; exit 2; }
  "$RLHF_PY" - "$JOB" "$ONLY" "$(cd "$SFT_ADAPTER" && pwd)" <<'PY'
import re, sys
path, only, adapter = sys.argv[1], set(sys.argv[2].split(",")), sys.argv[3]
head, *stages = open(path).read().split("[[stage]]")
names = [re.search(r'name = "([^"]+)"', s).group(1) for s in stages]
unknown = only - set(names)
if unknown:
    sys.exit(f"paper.sh: --only: no stage {sorted(unknown)} (stages: {', '.join(names)})")
head = head.replace("max_length = 2048", f'max_length = 2048\nmerge_adapters = ["{adapter}"]', 1)
head = re.sub(r'^name = "([^"]+)"', r'name = "\1-part"', head, count=1, flags=re.M)
kept = [re.sub(r'^init_from = "([^"]+)"\n', lambda m: m.group(0) if m.group(1) in only else "", s, flags=re.M)
        for s, n in zip(stages, names) if n in only]  # a stage dropped is not started from
open(path, "w").write(head + "".join("[[stage]]" + s for s in kept))
PY
fi

echo "paper.sh: preset $PRESET ($DTYPE): SFT $SFT_STEPS steps × $SFT_BATCH per method, dev ${DEV_N/#0/all} per task;" \
  "reward $RM_PREF_STEPS steps × $RM_PREF_BATCH preference pairs (≤ $PAIR_TOKENS tokens), then $RM_MC_STEPS × $RM_MC_BATCH FewCLUE examples" \
  "(all their pairs: ${MC_N/#0/all} examples per task, every wrong option; head lr $RM_HEAD_LR); PPO $PPO_ITERS iterations × $PPO_PROMPTS prompts × $PPO_SAMPLES samples for seeds $SEEDS and the label reward;" \
  "test_public ${TEST_N/#0/all} per task (by stride)"
echo "paper.sh: job file $JOB"
# Estimated minutes per stage, from seconds per step / iteration / eval
# prompt measured on this project's 2-core CPU machines with this preset
# (Intel Xeon; dtype auto): bf16 where the CPU has AMX (2026-12-05), f32
# where it has avx512_bf16 alone (2026-12-04/05). A GPU preset is not
# estimated here.
if [ "$PRESET" = cpu ]; then
  EST_DTYPE=f32
  grep -q amx_bf16 /proc/cpuinfo 2>/dev/null && EST_DTYPE=bf16
  "$RLHF_PY" - "$EST_DTYPE" "$SFT_STEPS" "$RM_MC_STEPS" "$PPO_ITERS" "$(echo $SEEDS | wc -w)" "$TEST_N" "$VARIANTS" "$DPO_STEPS" $METHODS <<'PY'
import sys
dtype = sys.argv[1]
sft, rm, ppo, seeds, test_n, variants, dpo = map(int, sys.argv[2:9])
methods = sys.argv[9:]
# Seconds: a PEFT SFT step of 8 examples, a full fine-tuning step of 8, a
# reward step of 4 examples with all their pairs, the reward model's dev
# and test evaluations in all, a PPO iteration of 16 prompts x 16 one-token
# samples, an eval prompt (choice and generate), loading the model once.
# DPO steps of 8 pairs and GRPO iterations: bf16 from the --variants run of
# 2026-12-06, which shared the CPU with builds (423 s for 16 DPO steps with
# their dev evaluations, 360-401 s for 8 GRPO iterations of 256 samples:
# upper bounds); f32 estimated. bf16 (AMX): SFT, PPO and eval from the run of 2026-12-05
# (3.3 s/step mean of LoRA, SSF, RepAdapter; 37 s/iteration; 302 s for 8
# models x 400 prompts), the reward step and its evaluations from that
# day's second run (427 s for 48 steps with 4 dev evaluations of ~37 s,
# 90 s more for loading and the test pairs). f32 (no AMX): SFT and the
# reward step from the runs of 2026-12-04/05 (the reward step before bare
# pairs and shared prompt forwards), its evaluations scaled from 240 s at
# half the examples (estimated), the PPO iteration from a run of this
# preset's PPO stage (434 s for 8 iterations); full fine-tuning measured
# only in bf16 without AMX.
C = {
    "bf16": dict(SFT=3.3, SFT_FULL=90.0, RM=5.8, RM_EVAL=230.0, PPO=37.0, EVAL=0.09, LOAD=10.0, DPO=22.0, GRPO=45.0),
    "f32": dict(SFT=10.5, SFT_FULL=90.0, RM=36.0, RM_EVAL=480.0, PPO=54.0, EVAL=0.3, LOAD=10.0, DPO=60.0, GRPO=65.0),
}[dtype]
models = 1 + len(methods) + seeds + 1 + (3 if variants else 0)
stages = [(f"sft-{m}", sft * (C["SFT_FULL"] if m == "full" else C["SFT"]) + C["LOAD"]) for m in methods]
stages += [("reward-mc", rm * C["RM"] + C["LOAD"] + C["RM_EVAL"])]
stages += [(f"ppo-s{k + 1}", ppo * C["PPO"] + C["LOAD"]) for k in range(seeds)]
if variants:
    stages += [("dpo-mc", dpo * C["DPO"] + C["LOAD"]), ("grpo-label", ppo * C["GRPO"] + C["LOAD"]),
               ("grpo-rm", ppo * C["GRPO"] + C["LOAD"])]
stages += [("ppo-label", ppo * C["PPO"] + C["LOAD"])]
stages += [("eval", models * (4 * test_n * C["EVAL"] + C["LOAD"]))]
print(f"paper.sh: estimated minutes on a 2-core CPU, {dtype}: "
      + ", ".join(f"{n} {s / 60:.0f}" for n, s in stages) + f"; total {sum(s for _, s in stages) / 60:.0f}")
PY
fi
if [ -f "$MODEL/model.safetensors" ] && [ -x "$RLHF_BIN/rlhf-worker" ]; then
  echo "paper.sh: model.dtype = $DTYPE here: $("$RLHF_BIN/rlhf-worker" dtype --model "$MODEL")"
fi
# The coordinator's own checks, on the workers this preset starts.
"$RLHF_BIN/rlhfctl" submit "$JOB" --dry-run --workers "$WORKER_NAMES"
[ "$JOB_ONLY" = 1 ] && exit 0

DIR=$OUT/cluster
PORT=${RLHF_PAPER_PORT:-50061}
export RLHF_COORDINATOR=http://127.0.0.1:$PORT
export RLHF_DATA_DIR=$DIR   # where rlhfctl finds the cluster's admin token
CTL="$RLHF_BIN/rlhfctl"
"$CTL" down --data-dir "$DIR" >/dev/null 2>&1 || true
mkdir -p "$DIR"
trap '"$CTL" down --data-dir "$DIR" >/dev/null 2>&1 || true' EXIT
# shellcheck disable=SC2086
"$CTL" up $WORKERS --data-dir "$DIR" --listen "127.0.0.1:$PORT"
start=$(date +%s)
job=$("$CTL" submit "$JOB" --request-id "paper-$PRESET" | tail -n 1)
echo "paper.sh: job $job (outputs in $DIR/jobs/$job)"
RUN=$DIR/jobs/$job
if ! "$CTL" watch "$job"; then
  # A failed or cancelled job keeps its finished stages in $RUN: resume it
  # there in one process (the same job file), skipping them. The cluster is
  # stopped first, so no attempt of it can still be running beside this one.
  "$CTL" down --data-dir "$DIR" >/dev/null 2>&1 || true
  echo "paper.sh: job $job did not succeed; resuming it in $RUN with rlhf-worker run (finished stages are kept)"
  "$RLHF_BIN/rlhf-worker" run "$JOB" --out "$RUN"
fi
"$CTL" report "$job" --out "$OUT/report" >/dev/null 2>&1 || "$CTL" down --data-dir "$DIR" >/dev/null 2>&1 || true
WALL=$(( $(date +%s) - start ))
echo "paper.sh: pipeline finished in $WALL s wall (this run)"
RESOLVED=$("$RLHF_BIN/rlhf-worker" dtype --model "$MODEL" | "$RLHF_PY" -c 'import json,sys; print(json.load(sys.stdin)["dtype"])')
if [ "$CROSSCHECK" = 1 ]; then
  # Base, the LoRA SFT model and the first PPO model (on it, when LoRA was the
  # best SFT method: peft loads LoRA only) with transformers + peft.
  PRED=$RUN/stages/eval/predictions.jsonl
  BEST=$("$RLHF_PY" scripts/paper_report.py "$RUN" --best-sft 2>/dev/null || true)
  names=(base sft-lora)
  [ "$BEST" = sft-lora ] && names+=(ppo-s1)
  for name in "${names[@]}"; do
    adapter=()
    case $name in
      base) ;;
      ppo-*) adapter=(--adapter "$RUN/stages/sft-lora/adapter" --adapter "$RUN/stages/$name/adapter") ;;
      *) adapter=(--adapter "$RUN/stages/$name/adapter") ;;
    esac
    "$RLHF_PY" scripts/crosscheck_predictions.py "$PRED" "$MODEL" --name "$name" "${adapter[@]}" --dtype "$RESOLVED" \
      | tee "$OUT/crosscheck-$name.jsonl" || echo "paper.sh: cross-check of $name differs by more than 0.5 points (see $OUT/crosscheck-$name.jsonl)"
  done
fi
"$RLHF_PY" scripts/paper_report.py "$RUN" "$OUT" --preset "$PRESET" --minutes "$(( (WALL + 30) / 60 ))" \
  --commit "$COMMIT" > "$OUT/paper.md"
cat "$OUT/paper.md"
echo "paper.sh: report $OUT/paper.md, figures $OUT/summary.json, curves and job report in $OUT/report"
