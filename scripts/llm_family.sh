#!/bin/bash
# The grid of docs/llm-family.md: the federated-LoRA family on SmolLM2 translating country
# names (configs/translations-family.toml), then its table and figures. Resumable: run it
# again after an interruption and finished runs are kept, unfinished ones resume.
#
#   bash scripts/llm_family.sh [OUT]          # OUT defaults to results/llm-family
set -euo pipefail
OUT=${1:-results/llm-family}
CONFIG=configs/translations-family.toml
# LoRA rank 8 on every linear layer of the 30 blocks, no adaptive bias, for every method
# (a method's own options, such as train_base, are in its --methods entry).
COMMON=(
  --set 'method.include=["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]'
  --set method.rank=8 --set method.bias=false --set 'method.layer_types=["linear"]'
  --out "$OUT" --jobs 2
)
FAMILY="fedit,local-adaptor:train_base=false,floral,floral-oracle:train_base=false"
FAMILY+=",floral-em:train_base=false,floral-seeded:train_base=false,ffa-lora,fedsa-lora,fdlora"
FAMILY+=",flasc:comm.upload=topk:0.25,flasc:comm.upload=topk:0.0625"
FAMILY+=",flasc:comm.upload=topk:0.25:comm.download=topk:0.25"
FAMILY+=",fedit:comm.upload=quant:8:comm.download=quant:8"
FAMILY+=",fedit:comm.upload=quant:4:comm.download=quant:4"
FAMILY+=",fedit:comm.upload=quant:2:comm.download=quant:2"
FAMILY+=",hetlora:rank_tiers=[2,4,8],flora:rank_tiers=[2,4,8]"
# pFedLoRA: client k runs SmolLM2's first 30, 20 or 10 blocks (k mod 3); its one shared
# adapter sits in blocks 0-9, which every client runs.
FAMILY+=',pfedlora:model.depths=[30,20,10]:method.include=["*.layers.[0-9].*_proj"]:model_lr=0.00002'
floral sweep "$CONFIG" --methods "$FAMILY" --seeds 0,1 "${COMMON[@]}"
# FLoRAL with a faster router.
floral sweep "$CONFIG" --methods "floral:train.router_lr=0.5" --seeds 0 "${COMMON[@]}"
# FLoRAL for twice the rounds: do its routers separate the four languages given time? And
# FLoRAL with 16 clients, four per language.
floral sweep "$CONFIG" --methods "floral:train.rounds=12" --seeds 0,1 "${COMMON[@]}"
floral sweep "$CONFIG" --methods "floral:task.num_clients=16" --seeds 0 "${COMMON[@]}"
# floral-em finding the languages: a rank-32 warm-up for 2 rounds, or an E-step on a quarter
# of each client's names that it never trains on.
floral sweep "$CONFIG" --seeds 0 "${COMMON[@]}" \
  --methods "floral-em:train_base=false:warmup_rank=32:warmup_rounds=2,floral-em:train_base=false:holdout=0.25"
python scripts/llm_family.py "$OUT" --figures docs
