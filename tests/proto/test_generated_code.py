"""The committed gRPC code is exactly what the committed .proto files generate."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto"


def test_regenerated_code_matches_committed(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", str(PROTO / "generate.sh"), str(tmp_path)], check=True, env=env)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc produced nothing"
    committed_dir = PROTO
    stale = [str(rel) for rel in generated if (committed_dir / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, f"generated code differs from the committed files (run proto/generate.sh): {stale}"
    # every committed generated file must still have a source
    committed = sorted(p.relative_to(committed_dir) for p in (committed_dir / "fedsilo" / "v1").glob("*_pb2*"))
    orphans = [str(rel) for rel in committed if rel not in generated]
    assert not orphans, f"generated files without a .proto source: {orphans}"


def test_package_is_fedsilo_v1() -> None:
    for proto in (PROTO / "fedsilo" / "v1").glob("*.proto"):
        assert "package fedsilo.v1;" in proto.read_text(), proto


def test_generated_modules_import_as_fedsilo_v1() -> None:
    from fedsilo.v1 import admin_pb2, federation_pb2, tensor_pb2

    assert federation_pb2.DESCRIPTOR.package == "fedsilo.v1"
    assert admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    assert tensor_pb2.DType.Value("DTYPE_FLOAT32") == 1
    assert shutil.which("bash")
