"""Write the openAPIV3Schema of each KServe CRD given as a compact, gzipped JSON file beside this one.

    python tests/data/kserve/extract_crd_schemas.py KSERVE_CHECKOUT/config/crd/full/serving.kserve.io_{inferenceservices,servingruntimes}.yaml

Each output, <group>_<plural>.<version>.schema.json.gz, holds {"group", "version", "kind", "source",
"source_sha256", "schema"}: the CRD's served schema, unchanged. tests/test_kubernetes.py validates
deploy/kubernetes/kserve/ against them. PROVENANCE.md says where the current files came from.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

import yaml


def extract(crd_path: Path, out_dir: Path) -> list[Path]:
    raw = crd_path.read_bytes()
    crd = yaml.safe_load(raw)
    if crd.get("kind") != "CustomResourceDefinition":
        raise SystemExit(f"{crd_path}: not a CustomResourceDefinition (kind {crd.get('kind')!r})")
    spec = crd["spec"]
    written = []
    for version in spec["versions"]:
        if not version.get("served"):
            continue
        record = {
            "group": spec["group"],
            "version": version["name"],
            "kind": spec["names"]["kind"],
            "source": crd_path.name,
            "source_sha256": hashlib.sha256(raw).hexdigest(),
            "schema": version["schema"]["openAPIV3Schema"],
        }
        out = out_dir / f"{spec['group']}_{spec['names']['plural']}.{version['name']}.schema.json.gz"
        text = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
        # mtime=0: the same CRD always gives the same bytes.
        out.write_bytes(gzip.compress(text, compresslevel=9, mtime=0))
        written.append(out)
    return written


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for name in argv:
        for out in extract(Path(name), Path(__file__).parent):
            print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
