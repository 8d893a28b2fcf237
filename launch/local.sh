#!/usr/bin/env bash
# One process on this machine (CPU or its GPUs):
#   launch/local.sh pretrain:model=tiny --config.workdir=/tmp/run [--config.a.b=value ...]
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG[:ARG] [--config.field=value ...]" >&2
  exit 2
fi
config="$1"; shift
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python=python3
exec "$python" -m jaxllm train --config="$config" "$@"
