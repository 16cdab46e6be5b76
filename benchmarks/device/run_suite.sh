#!/usr/bin/env bash
# The one prepared command for a lent H200: the GPU suite (benchmarks/gpu_suite.py) and its anchors, inside
# 5 minutes. Here, first:  make device-wheels  (.whl/: the wheels of benchmarks/device/wheels.txt, deepspeed
# built without ops, and shared/bench/gpu_anchor_ds.py beside them); then the device tool's call:
#   run(command="bash benchmarks/device/run_suite.sh", carry=[".whl"], timeout_s=480)
# Its JSON comes back as $OUT/gpu_suite.json (copy it to benchmarks/results/h200-DATE/), the log beside it.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers, peft, deepspeed, datasets, pydantic; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__)" \
  | tee -a "$OUT/device.txt"
timeout 330 python3 benchmarks/gpu_suite.py --anchor .whl/gpu_anchor_ds.py 2>&1 | tee "$OUT/gpu_suite.log"
tail -n 1 "$OUT/gpu_suite.log" > "$OUT/gpu_suite.json"
python3 -c "import json, sys; s = json.load(open(sys.argv[1])); print(json.dumps(s['ratios'], indent=1)); \
print(json.dumps(s['targets'], indent=1)); print('seconds', round(s['seconds']))" "$OUT/gpu_suite.json"
