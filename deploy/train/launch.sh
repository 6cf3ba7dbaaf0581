#!/usr/bin/env bash
# Launch `maskstream train` under torchrun on one node or many. Every argument is passed to the trainer.
#
#   one node, all GPUs:   deploy/train/launch.sh --data gs://BUCKET/shards --out /runs/bert --model-size base \
#                             --max-steps 100000 --batch-size 128 --eval-data gs://BUCKET/held_out
#   many nodes:           NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0 host> deploy/train/launch.sh ...
#   (in the Kubernetes Job, NODE_RANK comes from JOB_COMPLETION_INDEX and MASTER_ADDR from the headless service)
#
# Environment: NNODES (1), NODE_RANK (0), NPROC_PER_NODE (GPUs seen, else 1), MASTER_ADDR (localhost),
# MASTER_PORT (29500). --out must be shared storage visible to every node (rank 0 writes; resume reads it).
# A restarted job continues from the latest checkpoint: --resume is added when --out already holds one.
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-${JOB_COMPLETION_INDEX:-0}}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')"
fi
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-29500}"

args=("$@")
out=""
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ "${args[$i]}" == "--out" ]] && out="${args[$((i + 1))]:-}"
done
if [[ -n "$out" ]] && compgen -G "$out/ckpt-*.pt" > /dev/null && [[ " ${args[*]} " != *" --resume "* ]]; then
  echo "launch: $out holds checkpoints; continuing with --resume" >&2
  args+=(--resume)
fi

if [[ "$NNODES" == 1 ]]; then
  rdzv=(--standalone)
else
  rdzv=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --rdzv_backend=static
        --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
fi
exec torchrun "${rdzv[@]}" --nproc_per_node="$NPROC_PER_NODE" -m maskstream.trainer "${args[@]}"
