#!/usr/bin/env bash
# Device check (see benchmarks/device_check.py): HF generate vs our eager vs static/graph beam step, beam-step
# times at 10/40/160/640 live rows, list identity, GRPO samples/s, SFT tokens/s + MFU, at the Qwen2.5-0.5B and
# 1.5B shapes (random init, nothing downloaded), bf16 and fp32.  <= 8 minutes on one H200.
#   bash benchmarks/device_check.sh            # GPU
#   bash benchmarks/device_check.sh --smoke    # tiny, CPU, < 1 minute (tests/test_device_check.py)
# PYTHON=... picks the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${DEVICE_CHECK_TIMEOUT:-480}" "$PYTHON" benchmarks/device_check.py "$@"
