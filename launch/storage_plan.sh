# Sourced by tpu_pod.sh and slurm_gpu.sh: what every host of a multi-host run reads and writes, printed before it
# starts (and by --dry_run), from the training command's --config.* flags.
#
#   storage_plan HOSTS [--config.workdir=W] [--config.data.sources=S] [--config.tokenizer=T] [--config.init_from=I] ...
#
# A workdir in an object store (gs://, s3://) is written by every host directly: no shared filesystem is needed.

config_flag() {   # config_flag NAME ARGS...: the value of --config.NAME=VALUE among ARGS (empty when absent)
  local name="$1" a value=""
  shift
  for a in "$@"; do
    case "$a" in --config."$name"=*) value="${a#*=}" ;; esac
  done
  printf '%s' "$value"
}

is_remote() { [[ "$1" == *://* ]]; }

storage_plan() {
  local hosts="$1"
  shift
  local w sources tokenizer init
  w="$(config_flag workdir "$@")"
  sources="$(config_flag data.sources "$@")"
  tokenizer="$(config_flag tokenizer "$@")"
  init="$(config_flag init_from "$@")"
  [ -n "$w" ] || w="(the config's workdir)"
  echo "storage ($hosts):"
  if is_remote "$w"; then
    echo "  workdir $w: an object store every host writes directly (installed with the [cloud] extra);"
    echo "    finished checkpoint steps carry commit_success.txt, as objects cannot be renamed"
  else
    echo "  workdir $w: must be one filesystem that every host mounts (NFS, Filestore, a gcsfuse mount),"
    echo "    or a gs:// / s3:// URL"
  fi
  [ -n "$sources" ] || sources="the data sources of the config"
  [ -n "$tokenizer" ] || tokenizer="$w/tokenizer.model (trained there by process 0 when none is given)"
  echo "  every host reads:  $sources"
  if is_remote "$sources"; then
    echo "                     (a prepared folder in a bucket is copied once into each host's ~/.cache/jaxllm/prepared/)"
  fi
  echo "                     $tokenizer"
  [ -n "$init" ] && echo "                     $init (init_from: each host reads the shards its devices hold)"
  echo "                     $w/checkpoints/<newest step>/ when resuming (each host the shards its devices hold)"
  echo "  every host writes: $w/checkpoints/<step>/state/ocdbt.process_<i>/ (its own array shards)"
  echo "                     $w/checkpoints/<step>/data_per_process/process_<i>-of-<n>.json (its data position)"
  echo "  process 0 writes:  $w/config.json, $w/tokenizer.model, $w/checkpoints/<step>/ metadata and manifest,"
  if is_remote "$w"; then
    echo "                     $w/metrics.jsonl (rewritten whole every 30 s and before each checkpoint),"
    echo "                     $w/tensorboard/events.* (uploaded whole at the same times), $w/plots/*.png"
  else
    echo "                     $w/metrics.jsonl, $w/tensorboard/, $w/plots/*.png"
  fi
  if [[ "$w" == s3://* ]]; then
    echo "  s3://: every host needs AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.aws, or an"
    echo "    instance role); AWS_ENDPOINT_URL and AWS_REGION name an S3-compatible store (MinIO) and its region"
  elif [[ "$w" == gs://* ]]; then
    echo "  gs://: every host uses its VM's service account (or GOOGLE_APPLICATION_CREDENTIALS)"
  fi
}
