"""Stage the DINOv2 GPU study's inputs for a device machine whose calls carry at most 64 MiB each.

    python tools/device/stage.py                 # writes .stage/part1 .. partN (ignored by git), prints the plan

The backbone (88 MB) and the 7 tasks (92 MB) do not fit one call, so every file is cut into pieces of at most
``--piece-mb`` MB and the pieces are packed into parts that each fit one call (the working tree travels too). Each
device call carries one part (``carry: [".stage/partK"]``) and appends its pieces to ``/tmp/qvec-stage`` on the
machine, which stays warm between back-to-back calls; the last call then runs ``tools/device/dinov2-s-gpu.sh``,
which reassembles the files, checks their sha256 against ``.stage/MANIFEST.json`` and runs the study. The weights
travel exactly (fp32), not as a bf16 copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--out", type=Path, default=REPO / ".stage")
    ap.add_argument("--piece-mb", type=float, default=20.0)
    ap.add_argument("--part-mb", type=float, default=56.0, help="per call, leaving room for the working tree")
    args = ap.parse_args()
    files = [args.shared / "models" / "vit_small_patch14_dinov2.safetensors"]
    files += sorted((args.shared / "data").glob("*.npz"))
    piece, part_cap = int(args.piece_mb * 1e6), int(args.part_mb * 1e6)
    manifest: dict = {"files": {}, "parts": []}
    parts: list[list[tuple[str, bytes]]] = [[]]
    sizes = [0]
    for f in files:
        data = f.read_bytes()
        rel = str(f.relative_to(args.shared))
        manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "pieces": 0}
        for i in range(0, len(data), piece):
            chunk = data[i : i + piece]
            if sizes[-1] + len(chunk) > part_cap:
                parts.append([])
                sizes.append(0)
            name = f"{rel.replace('/', '__')}.{manifest['files'][rel]['pieces']:03d}"
            manifest["files"][rel]["pieces"] += 1
            parts[-1].append((name, chunk))
            sizes[-1] += len(chunk)
    for k, items in enumerate(parts, 1):
        folder = args.out / f"part{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, chunk in items:
            (folder / name).write_bytes(chunk)
        manifest["parts"].append([name for name, _ in items])
        print(f"part{k}: {len(items)} pieces, {sizes[k - 1] / 1e6:.1f} MB")
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    print(f"{len(parts)} calls: each `mkdir -p /tmp/qvec-stage && cp .stage/partK/* /tmp/qvec-stage/` with carry "
          "['.stage/partK', '.stage/MANIFEST.json']; the last one then runs tools/device/dinov2-s-gpu.sh")


if __name__ == "__main__":
    main()
