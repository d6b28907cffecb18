#!/usr/bin/env bash
# Multi-node DeiT training under SLURM: one task per node runs torchrun, which starts one
# process per GPU. Submit with:  sbatch scripts/slurm_train.sh configs/deit_small.yaml \
#   data.path=/data/imagenet train.output_dir=/checkpoints/deit_small
# data.batch_size is per GPU: 2 nodes x 8 GPUs x 128 = a global batch of 2048, and the lr
# scales with it (optim.lr x 2048 / 512). SLURM sends SIGUSR1 two minutes before the time
# limit; every rank finishes its step, rank 0 writes checkpoints/last.pt, and the job
# requeues itself, so the same command resumes from there.
#SBATCH --job-name=deit-fast
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm_train.sh CONFIG [overrides...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}

# The batch shell gets SIGUSR1 (B:); scancel passes it to torchrun on every node, torchrun
# forwards it to its workers and waits for their checkpoint; then the job requeues itself.
forward_and_requeue() {
    echo "deit-fast: time limit near; checkpointing and requeueing job $SLURM_JOB_ID"
    scancel --signal=USR1 "$SLURM_JOB_ID"
    wait "$SRUN_PID" || true
    scontrol requeue "$SLURM_JOB_ID"
}
trap forward_and_requeue USR1

srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --max-restarts=3 \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=100 \
    -m deit_fast train --config "$CONFIG" "$@" &
SRUN_PID=$!
wait "$SRUN_PID"
