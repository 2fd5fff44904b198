#!/usr/bin/env bash
# The DINOv2 GPU study in one prepared device call (after tools/device/stage.py's parts were copied to
# /tmp/qvec-stage by the calls before it): reassemble ../shared, install qvec, run configs/dinov2-s-gpu.toml,
# bring back the database, the report and the log under $OUT. Not yet run: no device was lent to the session that
# wrote it.
set -euo pipefail
STAGE=/tmp/qvec-stage
SHARED=/tmp/shared
python3 - "$STAGE" "$SHARED" <<'PY'
import hashlib, json, sys
from pathlib import Path
stage, shared = Path(sys.argv[1]), Path(sys.argv[2])
man = json.loads(Path(".stage/MANIFEST.json").read_text())
for rel, info in man["files"].items():
    name = rel.replace("/", "__")
    data = b"".join((stage / f"{name}.{i:03d}").read_bytes() for i in range(info["pieces"]))
    assert hashlib.sha256(data).hexdigest() == info["sha256"], f"{rel}: sha256 differs"
    (shared / rel).parent.mkdir(parents=True, exist_ok=True)
    (shared / rel).write_bytes(data)
print("reassembled", len(man["files"]), "files")
PY
python3 -m pip install -q -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
set -o pipefail
/usr/bin/time -v python3 -m qvec reproduce dinov2-s --config configs/dinov2-s-gpu.toml --data "$SHARED/data" \
    --weights "$SHARED/models/vit_small_patch14_dinov2.safetensors" --workdir /tmp/runs/dinov2-s-gpu \
    -o /tmp/report --workers 1 --quiet 2>&1 | tee "$OUT/study.log"
cp /tmp/runs/dinov2-s-gpu/dinov2-s-gpu.db "$OUT/"
tar czf "$OUT/report.tgz" -C /tmp report   # one file: a call brings back at most 8
