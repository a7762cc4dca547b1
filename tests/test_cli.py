"""The `hub` command line as an operator runs it: real subprocesses against a real hub subprocess,
judged by what they print and how they exit."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.hub import HubProcess
from harness.redis import free_port

UNKNOWN_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


def hub(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hub", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def user(server: HubProcess, *args: str, stdin: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    return hub("user", "--target", server.target, *args, stdin=stdin)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}"
    return result.stdout


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture
def server(hub_process: Callable[..., HubProcess]) -> HubProcess:
    """A `hub serve` subprocess on the in-memory store."""
    return hub_process()


# -- one user at a time -------------------------------------------------------------------


def test_user_lifecycle(server: HubProcess) -> None:
    ada = json.loads(ok(user(server, "create", "--email", "ada@example.com", "--name", "Ada")))
    assert (ada["email"], ada["name"], ada["status"]) == (
        "ada@example.com", "Ada", "USER_STATUS_ACTIVE")
    assert len(ada["id"]) == 26 and ada["version"] == "1"  # int64 is a string in proto JSON

    assert json.loads(ok(user(server, "get", ada["id"]))) == ada

    renamed = json.loads(ok(user(server, "update", ada["id"], "--name", "Ada L.",
                                 "--expected-version", "1")))
    assert (renamed["id"], renamed["name"], renamed["email"], renamed["version"]) == (
        ada["id"], "Ada L.", "ada@example.com", "2")

    bob = json.loads(ok(user(server, "create", "--email", "bob@example.com",
                             "--status", "inactive")))
    assert bob["status"] == "USER_STATUS_INACTIVE"

    listed = json_lines(ok(user(server, "list", "--page-size", "1")))
    assert [u["id"] for u in listed] == sorted([ada["id"], bob["id"]])
    assert {u["email"] for u in listed} == {"ada@example.com", "bob@example.com"}

    assert ok(user(server, "delete", ada["id"])).strip() == f"deleted {ada['id']}"
    gone = user(server, "get", ada["id"])
    assert gone.returncode == 1
    assert "NOT_FOUND" in gone.stderr and gone.stdout == ""
    assert [u["id"] for u in json_lines(ok(user(server, "list")))] == [bob["id"]]


def test_create_with_password_from_stdin_never_prints_it(server: HubProcess) -> None:
    out = ok(user(server, "create", "--email", "pw@example.com", "--password",
                  stdin="correct horse battery\n"))
    assert json.loads(out)["email"] == "pw@example.com"
    assert "correct horse" not in out


def test_create_refusals_name_the_field(server: HubProcess) -> None:
    bad = user(server, "create", "--email", "bad")
    assert bad.returncode == 1 and bad.stdout == ""
    assert "INVALID_ARGUMENT" in bad.stderr
    assert "  email: not a valid email address" in bad.stderr.splitlines()

    short = user(server, "create", "--email", "ok@example.com", "--password", stdin="short\n")
    assert short.returncode == 1
    assert any(line.startswith("  password:") for line in short.stderr.splitlines())

    ok(user(server, "create", "--email", "ada@example.com"))
    taken = user(server, "create", "--email", "ada@example.com")
    assert taken.returncode == 1 and "ALREADY_EXISTS" in taken.stderr
    # None of the refused creates left a user behind.
    assert [u["email"] for u in json_lines(ok(user(server, "list")))] == ["ada@example.com"]


def test_update_refusals(server: HubProcess) -> None:
    ada = json.loads(ok(user(server, "create", "--email", "ada@example.com")))
    stale = user(server, "update", ada["id"], "--name", "X", "--expected-version", "5")
    assert stale.returncode == 1 and "ABORTED" in stale.stderr

    nothing = user(server, "update", ada["id"])
    assert nothing.returncode == 2
    assert "at least one of email, name or status" in nothing.stderr
    assert json.loads(ok(user(server, "get", ada["id"]))) == ada


def test_bad_user_id_names_the_field(server: HubProcess) -> None:
    result = user(server, "get", "not-an-id")
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "user_id:" in result.stderr


def test_unreachable_hub_is_one_line_not_a_traceback() -> None:
    result = hub("user", "--target", f"127.0.0.1:{free_port()}", "get", UNKNOWN_ID)
    assert result.returncode == 1
    assert result.stderr.startswith("hub: UNAVAILABLE")
    assert "Traceback" not in result.stderr


# -- import -------------------------------------------------------------------------------


def test_import_csv_and_jsonl(server: HubProcess, tmp_path: Path) -> None:
    csv_file = tmp_path / "users.csv"
    csv_file.write_text(
        "email,name,password,status\n"
        "ada@example.com,Ada,correct horse,active\n"    # row 1
        "not-an-email,Bad,,\n"                           # row 2: refused, email
        "bob@example.com,Bob,,inactive\n"                # row 3
        "ADA@example.com,Ada again,,\n"                  # row 4: refused, duplicate email
        "cy@example.com,Cy,,\n"                          # row 5: status defaults to active
    )
    result = user(server, "import", str(csv_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "created 3, refused 2"
    refused = [line for line in result.stderr.splitlines() if line.startswith("row ")]
    assert sorted(refused) == [
        "row 2 (email): email: not a valid email address",
        "row 4 (email): email ADA@example.com is already registered",
    ]

    jsonl_file = tmp_path / "more.jsonl"
    jsonl_file.write_text(
        '{"email": "dee@example.com", "name": "Dee"}\n'
        "\n"                                             # blank lines are skipped
        '{"email": "eve@example.com", "status": "inactive"}\n'
        '{"email": "bob@example.com", "name": "Bob twice"}\n'  # row 3: taken by the CSV
        '{"email": "fay@example.com", "status": "retired"}\n'  # row 4: unknown status
    )
    result = user(server, "import", str(jsonl_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "created 2, refused 2"
    refused = sorted(line for line in result.stderr.splitlines() if line.startswith("row "))
    assert [line.split(":")[0] for line in refused] == ["row 3 (email)", "row 4 (status)"]

    listed = json_lines(ok(user(server, "list")))
    by_email = {u["email"]: u for u in listed}
    assert set(by_email) == {"ada@example.com", "bob@example.com", "cy@example.com",
                             "dee@example.com", "eve@example.com"}
    assert [u["id"] for u in listed] == sorted(u["id"] for u in listed)
    assert by_email["ada@example.com"]["name"] == "Ada"
    assert by_email["bob@example.com"]["status"] == "USER_STATUS_INACTIVE"
    assert by_email["cy@example.com"]["status"] == "USER_STATUS_ACTIVE"
    assert by_email["eve@example.com"]["status"] == "USER_STATUS_INACTIVE"


def test_import_csv_from_stdin(server: HubProcess) -> None:
    result = user(server, "import", "-", stdin="email,name\nsam@example.com,Sam\n")
    assert result.stdout.strip() == "created 1, refused 0"
    assert [u["name"] for u in json_lines(ok(user(server, "list")))] == ["Sam"]


def test_import_of_a_missing_file_is_one_line(server: HubProcess, tmp_path: Path) -> None:
    result = user(server, "import", str(tmp_path / "nope.csv"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "nope.csv" in result.stderr


def test_import_names_the_malformed_jsonl_line(server: HubProcess, tmp_path: Path) -> None:
    jsonl_file = tmp_path / "broken.jsonl"
    jsonl_file.write_text('{"email": "kim@example.com"}\n{broken\n')
    result = user(server, "import", str(jsonl_file))
    assert result.returncode != 0
    assert "line 2" in result.stderr
    # A broken file is refused whole: not even its good first line was imported.
    assert json_lines(ok(user(server, "list"))) == []


# -- serve and usage ----------------------------------------------------------------------


def test_serve_says_it_runs_on_the_in_memory_store(server: HubProcess) -> None:
    first = server.output().splitlines()[0]
    assert "embedded in-memory store" in first
    assert "data is lost on exit" in first


def test_serve_names_redis_without_its_password(
    hub_process: Callable[..., HubProcess], redis_url: str
) -> None:
    with_password = redis_url.replace("redis://", "redis://:s3cret@")
    # The first line is logged before the store is touched, so whether this Redis accepts
    # the password does not matter here: no wait for health, only for that line.
    server = hub_process(args=["--redis-url", with_password], start=False)
    server.spawn()
    try:
        first = server.wait_output(r".*\n").group()
    finally:
        server.kill()
    assert "Redis store" in first
    assert "s3cret" not in first and "***@" in first


def test_no_command_prints_usage_and_exits_2() -> None:
    result = hub()
    assert result.returncode == 2
    assert "usage: hub" in result.stdout


def test_user_without_a_subcommand_exits_2() -> None:
    result = hub("user")
    assert result.returncode == 2
