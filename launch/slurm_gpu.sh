#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, each driving all of its node's GPUs, over JAX's
# multi-controller runtime. Run it inside an allocation (sbatch or salloc), from a checkout on storage every
# node sees:
#
#   sbatch --nodes=4 --gpus-per-node=8 --signal=TERM@120 \
#       --wrap 'launch/slurm_gpu.sh -- pretrain:model=llama2-7b --config.workdir=/shared/run'
#   launch/slurm_gpu.sh [--nodes=N] [--port=P] [--logdir=DIR] [--dry_run] -- CONFIG[:ARG] [--config.a.b=value ...]
#
# The coordinator is the first host of the allocation (`scontrol show hostnames`); srun starts the same
# command on N nodes (default: all of the allocation) and --kill-on-bad-exit stops all if one fails. SLURM
# sends SIGTERM to every task before a pre-emption or the time limit (--signal=TERM@120 gives two minutes):
# the run saves a checkpoint and exits, and the same command resumes. Output lines carry the task number
# (srun --label) and are kept in DIR/slurm-<job>.log. The workdir may be a gs:// or s3:// URL (pip install
# 'jaxllm[cloud]'; srun passes this shell's AWS_* variables on) instead of a shared filesystem; what every node
# reads and writes is printed first. --dry_run prints the commands and runs nothing.
set -euo pipefail

usage() {
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

nodes="" port="" logdir="" dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --logdir=*) logdir="${1#*=}" ;;
    --dry_run|--dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) echo "slurm_gpu.sh: unknown flag $1 (the training command goes after --)" >&2; usage ;;
  esac
  shift
done
[ $# -ge 1 ] || usage
config="$1"; shift

if [ -z "${SLURM_JOB_ID:-}" ] || [ -z "${SLURM_JOB_NODELIST:-}" ]; then
  echo "slurm_gpu.sh: not inside a SLURM allocation (SLURM_JOB_ID / SLURM_JOB_NODELIST unset); submit it, e.g." >&2
  echo "  sbatch --nodes=4 --gpus-per-node=8 --wrap 'launch/slurm_gpu.sh -- $config ...'" >&2
  exit 2
fi

here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[ "${#hosts[@]}" -ge 1 ] || { echo "slurm_gpu.sh: scontrol listed no hosts for $SLURM_JOB_NODELIST" >&2; exit 1; }
nodes="${nodes:-${SLURM_JOB_NUM_NODES:-${#hosts[@]}}}"
port="${port:-$((12321 + SLURM_JOB_ID % 20000))}"
coordinator="${hosts[0]}:$port"
logdir="${logdir:-$here/logs/slurm}"
log="$logdir/slurm-$SLURM_JOB_ID.log"

# Process ids come from each task's SLURM_PROCID (jaxllm/distributed.py).
cmd=(srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 --label
     env JAXLLM_COORDINATOR="$coordinator" JAXLLM_NUM_PROCESSES="$nodes"
     "$python" -m jaxllm train --config="$config" "$@")
echo "SLURM job $SLURM_JOB_ID: $nodes node(s) of ${hosts[*]}; coordinator $coordinator"
. "$here/launch/storage_plan.sh"
storage_plan "$nodes node(s), one process each" "$@"
printf '+'; printf ' %q' "${cmd[@]}"; printf ' 2>&1 | tee -a %q\n' "$log"
[ "$dry_run" = 1 ] && exit 0
mkdir -p "$logdir"
"${cmd[@]}" 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
