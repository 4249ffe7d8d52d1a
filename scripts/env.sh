# Sourced by scripts/test and scripts/run-example: create .venv and install the pinned stack.
# CPU torch goes in first, so that no resolver ever pulls the CUDA build on a CPU machine.
set -euo pipefail
VENV="${KUBETUNER_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q "pip==25.3"
python -m pip install -q "torch==2.13.0"
python -m pip install -q -c constraints.txt -e ".[operator,trainer,dev]"
