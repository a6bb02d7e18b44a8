#!/usr/bin/env bash
# One GPU acceptance run (H100/H200, offline, imagegpt-medium-shaped random weights) -> one JSON file.
#   bench/gpu_check.sh [--out gpu_check.json] [--batch 64] [--buckets 8]
#   bench/gpu_check.sh --smoke --out /tmp/x.json     # tiny shape on CPU, seconds (run by the tests)
# Killed after GPU_CHECK_TIMEOUT seconds (default 480); the JSON keeps every section finished by then.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$python" "$here/gpu_check.py" "$@"
