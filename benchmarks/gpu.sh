#!/usr/bin/env bash
# The GPU suite (benchmarks/gpu_suite.py): pixformer's training step against timm's ViT, packed training
# with FlexAttention, two 2-minute CIFAR-10 runs, and the MAE and DiT steps against transformers' and
# diffusers', into one JSON file.
#
#   bash benchmarks/gpu.sh --out gpu.json              # on a CUDA machine (at most --budget seconds, 690)
#   bash benchmarks/gpu.sh --dry-run --out /tmp/g.json  # any CPU: every part at tiny sizes
#
# Options are gpu_suite.py's (--help). Wheels in .device/wheels (packages the machine lacks, e.g. from
# ../shared/device/bundle.sh, and diffusers' for the DiT parts: .venv/bin/pip download --no-deps
# -d .device/wheels diffusers==VERSION) are installed into a temporary folder first; src/ goes on PYTHONPATH, so
# the checkout runs as it is, without installing pixformer. $PYTHON picks the interpreter (default: .venv's
# where the checkout has one, as after `make install`, else python3).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
default_py=python3
[ -x .venv/bin/python ] && default_py=.venv/bin/python
py=${PYTHON:-$default_py}
site=""
if compgen -G ".device/wheels/*.whl" >/dev/null; then
  site=$(mktemp -d /tmp/pixformer-site.XXXXXX)
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .device/wheels/*.whl
fi
export PYTHONPATH="$root/src${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" benchmarks/gpu_suite.py "$@"
