#!/usr/bin/env bash
# The test suite and the GPU suite's dry run under another torch and Python than the pinned ones
# (constraints.txt), in a throwaway virtual environment, from the project root:
#
#   bash scripts/test_other_torch.sh 2.11.0 python3.12   # a common GPU image: torch 2.11, Python 3.12
#   bash scripts/test_other_torch.sh 2.9.0 python3.11    # the oldest torch pyproject.toml accepts
#
# torch comes from PyPI (on Linux its wheel carries CUDA and runs on a CPU too), with the matching
# torchvision and timm (as GPU images often carry them), and pixformer itself (editable) with its test
# extras, torch held at VERSION. Nothing is installed into .venv. The environment is kept in
# $VENV (default /tmp/pixformer-torch-VERSION) for a rerun; its logs and the dry run's JSON go to
# $VENV/logs. Extra arguments go to pytest (e.g. tests/test_cli.py -x).
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,6p "$0" >&2; exit 2; }
version=$1 python=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${VENV:-/tmp/pixformer-torch-$version}
minor=$(echo "$version" | cut -d. -f2)
vision="0.$((minor + 15)).0"                  # torchvision's release beside torch 2.N: 0.(N + 15)
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pins=$(mktemp)
printf 'torch==%s\ntorchvision==%s\n' "$version" "$vision" > "$pins"
# the package with its test extras, editable (the checkout itself); PIP_CONSTRAINT replaces any
# constraints file pip is configured with (a cap on torch, say)
PIP_CONSTRAINT="$pins" "$venv/bin/pip" install -q "torch==$version" "torchvision==$vision" timm -e ".[test]"
mkdir -p "$venv/logs"
"$venv/bin/python" -c "import sys, torch; print('Python', sys.version.split()[0], 'torch', torch.__version__)"
status=0
"$venv/bin/python" -m pytest tests -q -p no:cacheprovider "$@" > "$venv/logs/pytest.log" 2>&1 || status=1
tail -n 3 "$venv/logs/pytest.log"
PYTHON="$venv/bin/python" bash benchmarks/gpu.sh --dry-run --jobs 2 --out "$venv/logs/gpu-dry.json" \
  > "$venv/logs/gpu-dry.log" 2>&1 || status=1
"$venv/bin/python" - "$venv/logs/gpu-dry.json" <<'PY' || status=1
import json, sys
parts = json.load(open(sys.argv[1]))["parts"]
bad = {name: p.get("reason", p.get("status")) for name, p in parts.items() if p.get("status") != "ok"}
print(f"GPU suite dry run: {len(parts) - len(bad)} of {len(parts)} parts ok" + "".join(f"\n  {n}: {r}" for n, r in bad.items()))
sys.exit(1 if bad else 0)
PY
rm -f "$pins"
exit $status
