#!/usr/bin/env bash
# Issue 23's acceptance matrix: tiny GPT-2 and Llama train on a uint16 token file, then
# `gpupar verify` under ddp, fsdp, --tp 2 and --pp 2 at seeds 1, 2 and 42 (world 2), and
# --dp 2 --tp 2 at world 4. One line per run; about 5 minutes on 2 CPU cores.
#   bash benchmarks/hf_verify_matrix.sh [OUT_DIR]      (needs the [hf] extra)
set -uo pipefail
out="${1:-runs/hf-verify-matrix}"
mkdir -p "$out" && cd "$out"
HF_GPT2='n_layer=2,n_embd=64,n_head=4,vocab_size=256,n_positions=64'
HF_LLAMA='hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,vocab_size=256,max_position_embeddings=64'
SIZES=(--seq-len 32 --samples 64 --epochs 12 --no-dropout)  # the test suite's sizes
python3 -c "import numpy as np; np.random.default_rng(0).integers(0, 256, 20000).astype(np.uint16).tofile('tokens.bin')"
verdict() { grep -E '^(PASS|FAIL)' "$1" | tail -1 | cut -c1-100; }
for model in gpt2 llama; do
  cfg=$HF_GPT2; [ "$model" = llama ] && cfg=$HF_LLAMA
  gpupar train --model "hf:$model" --hf-config "$cfg" --data tokens.bin --seq-len 32 --epochs 2 \
    --run-dir "train-$model" > "train-$model.log" 2>&1
  echo "train hf:$model on tokens.bin: exit $?"
  for layout in "--strategy ddp" "--strategy fsdp" "--tp 2" "--pp 2"; do
    for seed in 1 2 42; do
      name="verify-$model-${layout//[ -]/}-$seed"
      # shellcheck disable=SC2086  # the layout is two words
      gpupar verify --model "hf:$model" --hf-config "$cfg" "${SIZES[@]}" $layout --nproc-per-node 2 \
        --seed "$seed" --run-dir "$name" > "$name.log" 2>&1
      echo "verify hf:$model $layout seed $seed: exit $? $(verdict "$name.log")"
    done
  done
done
gpupar verify --model hf:llama --hf-config "$HF_LLAMA" "${SIZES[@]}" --dp 2 --tp 2 --nproc-per-node 4 --seed 1 \
  --run-dir verify-llama-dp2tp2 > verify-llama-dp2tp2.log 2>&1
echo "verify hf:llama --dp 2 --tp 2 (world 4) seed 1: exit $? $(verdict verify-llama-dp2tp2.log)"
