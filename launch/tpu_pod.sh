#!/usr/bin/env bash
# Every worker (host) of a Cloud TPU pod slice runs the same `jaxllm train`: one process per host, JAX's
# multi-controller runtime (jax.distributed reads the slice's topology from the TPU metadata).
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=ID] [--logdir=DIR] [--skip_install] [--dry_run] \
#       -- pretrain:model=llama2-7b --config.workdir=gs://bucket/run [--config.a.b=value ...]
#
# 1. Packs this checkout (tracked and untracked, non-ignored files), copies it to every worker and installs
#    it with the [tpu] extra into ~/jaxllm/.venv (--skip_install: reuse what is there).
# 2. Starts the command on all workers at once (`gcloud compute tpus tpu-vm ssh --worker=all`); each
#    worker's output is kept in DIR/<worker>.log (default logs/tpu/NAME-<time>) and streamed here.
# 3. If a worker fails (or on Ctrl-C), stops every worker: SIGTERM first (the run saves a checkpoint if it
#    still can), SIGKILL after a grace period. Running the same command again resumes from the newest
#    checkpoint.
# The workdir is storage every worker sees: a gs:// or s3:// URL (written directly by every worker; the [cloud]
# extra is installed), or a shared mount (Filestore/NFS, gcsfuse). The commands print what each worker reads and
# writes there. --dry_run prints the commands and runs nothing.
set -euo pipefail

usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

tpu="" zone="" project="" logdir="" install=1 dry_run=0 grace=120
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --logdir=*) logdir="${1#*=}" ;;
    --grace=*) grace="${1#*=}" ;;
    --skip_install) install=0 ;;
    --dry_run|--dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown flag $1 (the training command goes after --)" >&2; usage ;;
  esac
  shift
done
[ -n "$tpu" ] && [ -n "$zone" ] && [ $# -ge 1 ] || usage
config="$1"; shift

here="$(cd "$(dirname "$0")/.." && pwd)"
. "$here/launch/storage_plan.sh"
workdir="$(config_flag workdir "$@")"
extras="tpu"
is_remote "$workdir" && extras="tpu,cloud"      # gcsfs / s3fs: the workers write the bucket themselves
# An S3-compatible store's endpoint and region go to every worker (credentials stay in each worker's own setup).
env_prefix="JAXLLM_DISTRIBUTED=tpu"
if [[ "$workdir" == s3://* ]]; then
  for v in AWS_ENDPOINT_URL AWS_REGION; do
    [ -n "${!v:-}" ] && env_prefix+=" $v=$(printf '%q' "${!v}")"
  done
fi
logdir="${logdir:-$here/logs/tpu/$tpu-$(date +%Y%m%d-%H%M%S)}"
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[ -n "$project" ] && where+=(--project="$project")

# The training command as the workers' shell will read it (every argument quoted).
train=$(printf '%q ' .venv/bin/python -m jaxllm train --config="$config" "$@")
remote_run="cd ~/jaxllm && { ${env_prefix} ${train}& pid=\$!; echo \$pid > ~/jaxllm-train.pid; \
wait \$pid; rc=\$?; echo \"[jaxllm] worker \$(hostname) exit code \$rc\"; exit \$rc; }"
remote_install="mkdir -p ~/jaxllm && tar -xzf ~/jaxllm-src.tar.gz -C ~/jaxllm && cd ~/jaxllm && \
{ [ -x .venv/bin/python ] || python3 -m venv .venv; } && .venv/bin/pip install -q --upgrade pip && \
.venv/bin/pip install -q -e \".[$extras]\""
remote_stop="pid=\$(cat ~/jaxllm-train.pid 2>/dev/null) || exit 0; kill -TERM \$pid 2>/dev/null || exit 0; \
for i in \$(seq $grace); do kill -0 \$pid 2>/dev/null || exit 0; sleep 1; done; kill -KILL \$pid 2>/dev/null; true"

show() {   # prints a command, quoted so that it can be pasted into a shell
  local out="+" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then out+=" $a"
    elif [[ "$a" != *"'"* ]]; then out+=" '$a'"
    else out+=" $(printf '%q' "$a")"; fi
  done
  echo "$out"
}
run() {
  show "$@"
  [ "$dry_run" = 1 ] || "$@"
}

tarball="${TMPDIR:-/tmp}/jaxllm-src-$tpu.tar.gz"
echo "TPU pod slice $tpu ($zone): every worker runs"
echo "  $env_prefix $train"
echo "worker logs: $logdir/<worker>.log"
storage_plan "every worker of $tpu, one process each" "$@"

if [ "$install" = 1 ]; then
  echo "+ git -C $here ls-files -z --cached --others --exclude-standard | tar -C $here --null -T - -czf $tarball"
  if [ "$dry_run" = 0 ]; then
    git -C "$here" ls-files -z --cached --others --exclude-standard | tar -C "$here" --null -T - -czf "$tarball"
  fi
  run "${gcloud_tpu[@]}" scp "$tarball" "$tpu:jaxllm-src.tar.gz" "${where[@]}" --worker=all
  run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$remote_install"
fi

stop_all() {
  echo "stopping the job on every worker (SIGTERM, SIGKILL after ${grace}s)" >&2
  run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$remote_stop" || true
}

if [ "$dry_run" = 1 ]; then
  run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all --output-directory="$logdir" --command="$remote_run"
  echo "on failure or Ctrl-C:"
  show "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$remote_stop"
  exit 0
fi

mkdir -p "$logdir"
workers=$("${gcloud_tpu[@]}" describe "$tpu" "${where[@]}" --format='value(networkEndpoints.len())')
show "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all --output-directory="$logdir" --command="$remote_run"
"${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all --output-directory="$logdir" --command="$remote_run" &
job=$!
trap 'stop_all; kill $job 2>/dev/null; exit 130' INT TERM

# Stream every worker's log here once all have started writing.
for _ in $(seq 120); do
  [ "$(find "$logdir" -name '*.log' | wc -l)" -ge "${workers:-1}" ] && break
  sleep 1
done
tail -n +1 -F "$logdir"/*.log 2>/dev/null &
tailer=$!

# A worker that exits with an error stops the others (they would wait on it in a collective).
failed=0
while kill -0 "$job" 2>/dev/null; do
  if grep -qE '^\[jaxllm\] worker .* exit code [1-9]' "$logdir"/*.log 2>/dev/null; then
    failed=1
    grep -hE '^\[jaxllm\] worker .* exit code [1-9]' "$logdir"/*.log >&2
    stop_all
    break
  fi
  sleep 5
done
rc=0
wait "$job" || rc=$?
kill "$tailer" 2>/dev/null || true
if [ "$rc" != 0 ] && [ "$failed" = 0 ]; then
  stop_all
fi
echo "worker logs kept in $logdir (exit code $rc)"
exit "$rc"
