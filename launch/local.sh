#!/usr/bin/env bash
# One process on this machine (CPU or its GPUs):
#   launch/local.sh pretrain:model=tiny --config.workdir=/tmp/run [--config.a.b=value ...]
# Which jaxllm runs, first found: $PYTHON (a Python with jaxllm installed), this checkout's .venv, the `jaxllm`
# command on PATH (pip install), or python3 if it imports jaxllm and jax.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG[:ARG] [--config.field=value ...]" >&2
  exit 2
fi
config="$1"; shift
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then
  exec "$PYTHON" -m jaxllm train --config="$config" "$@"
elif [ -x "$here/.venv/bin/python" ]; then
  exec "$here/.venv/bin/python" -m jaxllm train --config="$config" "$@"
elif command -v jaxllm >/dev/null 2>&1; then
  exec jaxllm train --config="$config" "$@"
elif command -v python3 >/dev/null 2>&1 && python3 -c "import jax, jaxllm" >/dev/null 2>&1; then
  exec python3 -m jaxllm train --config="$config" "$@"
fi
echo "$0: no jaxllm found: no $here/.venv, no \`jaxllm\` on PATH, and python3 cannot import jaxllm and jax." >&2
install="pip install jaxllm"
[ -f "$here/setup.py" ] && install="pip install -e $here"
echo "Install it ($install), or point at a Python that has it:" >&2
echo "  PYTHON=/path/to/venv/bin/python $0 $config ..." >&2
exit 2
