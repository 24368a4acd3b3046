#!/usr/bin/env bash
# One GPU check of everything that needs a GPU, all results under one folder (<= 9 min on one H100/A100:
# the step limits add up to 540 s). RESULTS_DIR is relative to the repository root.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]            # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run [RESULTS_DIR]  # the same steps on the CPU at tiny sizes (seconds)
#
# Steps (each with its own time limit; a failing step is recorded in summary.txt and the rest still run):
#   1. env          nvidia-smi, torch/CUDA versions
#   2. quickstart   agentlit fit --config configs/quickstart.yaml on CUDA with bf16-mixed (accuracy, time)
#   3. attention    agent attention vs SDPA (flash, bf16) at N = 3136, 12544, 50176 tokens, time + peak memory
#   4. models       the paper's speed pairs (Agent-PVT-S vs PVT-L, Agent-Swin-S vs Swin-B) at batch 64:
#                   eager fp32, bf16 autocast, torch.compile; throughput + peak memory
#   5. agentsd      one UNet step of the SD 1.5 architecture in fp16 at 512² and 1024²: unpatched, tomesd,
#                   AgentSD agent and ToMe phases, the ceiling; time + peak memory, 50-step estimate
#   6. scaling      agent vs softmax pairs (DeiT-T, Swin-T, PVT-S) at 224², 448², 896² and the detection
#                   backbones at 800x1344, bf16: inference/training speed ratio beside the MAC ratio, peak memory
# Results: RESULTS_DIR (default benchmarks/results/gpu_check_<date>) holds one JSON/log per step and summary.txt.
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu_check_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
export HF_HUB_OFFLINE=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.log, note status and seconds
    local name=$1 limit=$(( $2 * SLACK ))
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc ($((SECONDS - t0)) s)" | tee -a "$SUMMARY"
}

SLACK=1  # the GPU limits; the CPU dry run only checks that every step works, however busy the machine
if [ $DRY = 1 ]; then
    SLACK=10; DEV=cpu; QS=(--trainer.accelerator cpu --trainer.precision bf16-mixed --trainer.max_epochs 1
                 --trainer.limit_train_batches 2 --trainer.limit_val_batches 2)
    ATT=(--tokens 64 256 --agents 16 --heads 2 --head-dim 16 --repeats 1 --warmup 0 --dtype bfloat16)
    MOD=(--models agent_deit_tiny:deit_tiny_patch16_224 --batch-size 1 --repeats 1 --warmup 0 --variants eager bf16
         --threads 1)
    SD=(--arch tiny --sizes 64 --repeats 1 --warmup 0 --dtype float32 --no-cpu-memory)
    SCALE=(--pairs deit --sizes 112:1 --repeats 1 --warmup 0 --bf16)
else
    DEV=cuda; QS=(--trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed)
    ATT=(--tokens 3136 12544 50176 --agents 49 --heads 4 --head-dim 64 --batch 8 --repeats 10 --warmup 3
         --dtype bfloat16 --naive-max-tokens 12544)
    MOD=(--batch-size 64 --repeats 10 --warmup 3 --variants eager bf16 compiled
         --models agent_pvt_small:pvt_v1_large agent_swin_small:swin_base_patch4_window7_224)
    SD=(--arch sd15 --sizes 512 1024 --batch 2 --repeats 5 --warmup 2 --dtype float16)
    SCALE=(--sizes 224:64 448:16 896:4 800x1344:2 --repeats 5 --warmup 2 --bf16)
fi

{ date -u; uname -a; nvidia-smi 2>&1 | head -20
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"; } > "$OUT/env.txt" 2>&1
echo "device: $DEV, dry-run: $DRY" >> "$SUMMARY"

step quickstart 120 agentlit fit --config configs/quickstart.yaml "${QS[@]}" \
    --trainer.default_root_dir "$OUT/quickstart" --trainer.enable_progress_bar false
grep -i "acc1" "$OUT/quickstart.log" | tail -2 >> "$SUMMARY"
step attention 60 python benchmarks/attention.py "${ATT[@]}" --device $DEV --output "$OUT/attention.json"
step models 180 python benchmarks/models.py "${MOD[@]}" --no-train --device $DEV --output "$OUT/models.json"
step agentsd 120 python benchmarks/agentsd.py --unet "${SD[@]}" --ratio 0.5 --device $DEV \
    --output "$OUT/agentsd_unet.json"
step scaling 60 python benchmarks/scaling.py "${SCALE[@]}" --device $DEV --output "$OUT/scaling.json"
grep -E "speedup|vs " "$OUT/models.log" "$OUT/agentsd.log" >> "$SUMMARY" 2>/dev/null
grep -E "^\| " "$OUT/scaling.log" >> "$SUMMARY" 2>/dev/null
echo "results in $OUT" | tee -a "$SUMMARY"
