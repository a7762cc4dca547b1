"""A client generated from the seed's proto text works against hub unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from hub.rpc.server import HubServer

pytestmark = pytest.mark.anyio
DATA = Path(__file__).parent / "data"


def _generate_seed_stubs(out: Path) -> None:
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{DATA}", f"-I{include}",
         f"--python_out={out}", f"--grpc_python_out={out}", "seed_user_service.proto"],
        check=True,
    )
    # The seed names its file user_service.proto; keep its module names.
    for suffix in ("_pb2.py", "_pb2_grpc.py"):
        (out / f"seed_user_service{suffix}").rename(out / f"user_service{suffix}")
    grpc_mod = out / "user_service_pb2_grpc.py"
    grpc_mod.write_text(grpc_mod.read_text().replace("seed_user_service_pb2", "user_service_pb2"))


async def test_seed_client_works_against_hub(hub: HubServer, tmp_path: Path) -> None:
    _generate_seed_stubs(tmp_path)
    # A separate process: the seed's descriptors clash with ours in one protobuf pool.
    result = await anyio.run_process(
        [sys.executable, str(DATA / "seed_client.py"), str(tmp_path), f"127.0.0.1:{hub.port}"],
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    seen = json.loads(result.stdout)
    assert seen["created"][1:] == ["seed@example.com", "Seed", 1, True]
    assert seen["got"] == [seen["created"][0], "seed@example.com"]
    assert seen["bulk"] == [3, 3]  # the bad row is refused, the good ones created
    assert seen["listed"] == ["seed@example.com", "s0@example.com", "s1@example.com",
                              "s2@example.com"]
    assert seen["missing"] == "NOT_FOUND"
