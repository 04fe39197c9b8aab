"""The checked-in generated code matches protos/**/*.proto and imports from the `protos` package."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from protos import generate
from protos.triptych.v1 import triptych_pb2 as pb
from protos.triptych.v1 import triptych_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh():
    assert generate.stale_files() == [], "run `make protos` (python -m protos.generate)"


def test_check_cli_exit_code():
    proc = subprocess.run([sys.executable, "-m", "protos.generate", "--check"], cwd=REPO, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()


def test_generated_imports_do_not_touch_sdk_package():
    for path in (REPO / "protos").rglob("*_pb2*.py"):
        bad = re.findall(r"^\s*(?:import|from) triptych\b.*$", path.read_text(), flags=re.M)
        assert bad == [], (path, bad)


def test_service_and_enums():
    service = pb.DESCRIPTOR.services_by_name["Triptych"]
    assert pb.DESCRIPTOR.package == "triptych.v1"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "Abort", "GetModelInfo", "GetClusterStatus"}
    assert methods["Generate"].server_streaming and not methods["Abort"].server_streaming
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name
    assert hasattr(pb_grpc, "TriptychStub") and hasattr(pb_grpc, "add_TriptychServicer_to_server")


def test_generate_request_roundtrip():
    req = pb.GenerateRequest(prompt="hi", images=[pb.Image(data=b"x", mime_type="image/png")])
    req.sampling.seed = 0
    back = pb.GenerateRequest.FromString(req.SerializeToString())
    assert back.WhichOneof("input") == "prompt" and back.sampling.HasField("seed")
    assert not back.sampling.HasField("temperature")
