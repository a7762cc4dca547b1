"""The `hub` command line as an operator runs it: real subprocesses against a real hub subprocess,
judged by what they print and how they exit."""

from __future__ import annotations

import importlib.metadata
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from harness.hub import LISTENING, HubProcess
from harness.redis import dying_with_parent, free_port

UNKNOWN_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
SECRET = "cli-test-secret"


def clean_env(**env: str) -> dict[str, str]:
    """This process's environment without HUB_* (a developer's HUB_TOKEN or HUB_TARGET must
    not reach the commands under test), plus `env`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("HUB_")}, **env}


def hub(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hub", *args], input=stdin, env=clean_env(**env),
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
        "ada@example.com,Ada,correct horse,active\n"    # row 0
        "not-an-email,Bad,,\n"                           # row 1: refused, email
        "bob@example.com,Bob,,inactive\n"                # row 2
        "ADA@example.com,Ada again,,\n"                  # row 3: refused, duplicate email
        "cy@example.com,Cy,,\n"                          # row 4: status defaults to active
    )
    result = user(server, "import", str(csv_file))
    # Rows are numbered from 0, as the API's BulkCreateError.index; a refused row fails the
    # command (exit 1) once every row has been tried.
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == "created 3, refused 2"
    refused = [line for line in result.stderr.splitlines() if line.startswith("row ")]
    assert sorted(refused) == [
        "row 1 (email): email: not a valid email address",
        "row 3 (email): email ADA@example.com is already registered",
    ]

    jsonl_file = tmp_path / "more.jsonl"
    jsonl_file.write_text(
        '{"email": "dee@example.com", "name": "Dee"}\n'
        "\n"                                             # blank lines are skipped
        '{"email": "eve@example.com", "status": "inactive"}\n'
        '{"email": "bob@example.com", "name": "Bob twice"}\n'  # row 2: taken by the CSV
        '{"email": "fay@example.com", "status": "retired"}\n'  # row 3: unknown status
    )
    result = user(server, "import", str(jsonl_file))
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == "created 2, refused 2"
    refused = sorted(line for line in result.stderr.splitlines() if line.startswith("row "))
    assert [line.split(":")[0] for line in refused] == ["row 2 (email)", "row 3 (status)"]
    assert 'row 3 (status): status: unknown "retired"; allowed: active, inactive' in refused

    listed = json_lines(ok(user(server, "list")))
    by_email = {u["email"]: u for u in listed}
    assert set(by_email) == {"ada@example.com", "bob@example.com", "cy@example.com",
                             "dee@example.com", "eve@example.com"}
    assert [u["id"] for u in listed] == sorted(u["id"] for u in listed)
    assert by_email["ada@example.com"]["name"] == "Ada"
    assert by_email["bob@example.com"]["status"] == "USER_STATUS_INACTIVE"
    assert by_email["cy@example.com"]["status"] == "USER_STATUS_ACTIVE"
    assert by_email["eve@example.com"]["status"] == "USER_STATUS_INACTIVE"


def test_what_list_prints_imports_into_another_hub(
    server: HubProcess, hub_process: Callable[..., HubProcess], tmp_path: Path,
) -> None:
    # The README's way to copy users to a new keyspace (e.g. from one Redis to a cluster).
    ok(user(server, "create", "--email", "ann@example.com", "--name", "Ann"))
    ok(user(server, "create", "--email", "ben@example.com", "--name", "Ben",
            "--status", "inactive"))
    exported = tmp_path / "users.jsonl"
    exported.write_text(ok(user(server, "list")))
    other = hub_process()
    assert ok(user(other, "import", str(exported))).strip() == "created 2, refused 0"
    copied = {u["email"]: (u["name"], u["status"]) for u in json_lines(ok(user(other, "list")))}
    assert copied == {"ann@example.com": ("Ann", "USER_STATUS_ACTIVE"),
                      "ben@example.com": ("Ben", "USER_STATUS_INACTIVE")}


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
    # A broken line is one refused row (row 1, counted from 0), not a refused file: the good
    # line before it was imported.
    assert "row 1: line 2: not valid JSON" in result.stderr
    assert result.stdout.strip() == "created 1, refused 1"
    assert [u["email"] for u in json_lines(ok(user(server, "list")))] == ["kim@example.com"]


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


def test_version_names_the_installed_distribution() -> None:
    result = hub("--version")
    assert result.returncode == 0
    assert result.stdout == f"hub {importlib.metadata.version('hub-userfeed')}\n"


def test_help_describes_the_tool() -> None:
    out = ok(hub("--help"))
    assert "Run a hub server, manage its users and watch their changes live." in out
    assert "nothing else lives here" not in out  # the module's note for developers
    for command in ("serve", "user", "watch", "token"):
        assert command in out


def test_serve_on_a_busy_port_is_one_line(server: HubProcess) -> None:
    result = hub("serve", "--port", str(server.port))
    assert result.returncode == 1
    assert result.stderr == f"hub: cannot bind 127.0.0.1:{server.port}: address already in use\n"
    assert result.stdout == ""


def test_serve_with_workers_on_a_busy_port_is_one_line(server: HubProcess,
                                                        redis_url: str) -> None:
    result = hub("serve", "--workers", "2", "--redis-url", redis_url, "--port", str(server.port))
    assert result.returncode == 1
    assert result.stderr == f"hub: cannot bind 127.0.0.1:{server.port}: address already in use\n"


def test_client_options_are_refused_where_nothing_uses_them() -> None:
    result = hub("--token", "T", "serve")
    assert result.returncode == 2
    assert "--token is an option of the user and watch commands" in result.stderr


# -- client options before or after the command --------------------------------------------


def test_target_goes_before_or_after_the_command(server: HubProcess) -> None:
    ada = json.loads(ok(hub("user", "create", "--email", "ada@example.com",
                            "--target", server.target)))
    for args in (("user", "list", "--target", server.target),
                 ("user", "--target", server.target, "list"),
                 ("--target", server.target, "user", "list"),
                 ("user", "--timeout", "10", "list", "--target", server.target)):
        assert json_lines(ok(hub(*args))) == [ada], args
    # The innermost one wins: an unreachable outer one is not used.
    dead = f"127.0.0.1:{free_port()}"
    assert json_lines(ok(hub("--target", dead, "user", "--target", dead, "list",
                             "--target", server.target))) == [ada]
    assert json_lines(ok(hub("user", "list", HUB_TARGET=server.target))) == [ada]


def test_token_goes_before_or_after_the_command(
    hub_process: Callable[..., HubProcess]
) -> None:
    server = hub_process(HUB_JWT_SECRET=SECRET)
    token = ok(hub("token", "--secret", SECRET, "--sub", "alice")).strip()
    ada = json.loads(ok(hub("user", "create", "--email", "ada@example.com",  # a public method
                            "--target", server.target)))
    for args in (("user", "list", "--token", token, "--target", server.target),
                 ("user", "--token", token, "list", "--target", server.target),
                 ("user", "--target", server.target, "--token", token, "list"),
                 ("--token", token, "user", "list", "--target", server.target)):
        assert json_lines(ok(hub(*args))) == [ada], args
    refused = hub("user", "list", "--target", server.target)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def _write_cert(ca: trustme.CA, directory: Path, name: str, *hosts: str) -> tuple[Path, Path]:
    leaf = ca.issue_cert(*hosts)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def test_tls_options_go_before_or_after_the_command(
    hub_process: Callable[..., HubProcess], tmp_path: Path
) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_cert, server_key = _write_cert(ca, tmp_path, "server", "127.0.0.1", "localhost")
    client_cert, client_key = _write_cert(ca, tmp_path, "client", "cli.example")
    # mTLS: the server wants a client certificate signed by the same CA.
    server = hub_process(HUB_TLS_CERT=str(server_cert), HUB_TLS_KEY=str(server_key),
                         HUB_TLS_CLIENT_CA=str(ca_file), start=False)
    server.spawn()
    server.wait_output(LISTENING)  # its health is behind TLS too: the log says when it listens
    tls = ("--tls-ca", str(ca_file), "--tls-cert", str(client_cert), "--tls-key", str(client_key))

    ada = json.loads(ok(hub("user", "create", "--email", "ada@example.com",
                            "--target", server.target, *tls)))
    for args in (("user", "list", "--target", server.target, *tls),
                 ("user", "--target", server.target, *tls, "list"),
                 ("user", *tls[:2], "list", "--target", server.target, *tls[2:]),
                 (*tls, "user", "list", "--target", server.target)):
        assert json_lines(ok(hub(*args))) == [ada], args

    no_client_cert = hub("user", "list", "--target", server.target, "--tls-ca", str(ca_file))
    assert no_client_cert.returncode == 1 and "UNAVAILABLE" in no_client_cert.stderr
    half = hub("user", "list", "--target", server.target, *tls[:4])
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr
    missing = hub("user", "list", "--target", server.target, "--tls-ca", str(tmp_path / "no.pem"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("hub: cannot read --tls-ca")


# -- ids and errors ----------------------------------------------------------------------------


def test_user_ids_are_taken_in_any_case(server: HubProcess) -> None:
    ada = json.loads(ok(user(server, "create", "--email", "ada@example.com")))
    lower = ada["id"].lower()
    assert json.loads(ok(user(server, "get", lower))) == ada
    renamed = json.loads(ok(user(server, "update", f" {lower} ", "--status", "Inactive")))
    assert (renamed["id"], renamed["status"]) == (ada["id"], "USER_STATUS_INACTIVE")
    assert json_lines(ok(user(server, "list", "--after", lower))) == []
    assert ok(user(server, "delete", lower)).strip() == f"deleted {ada['id']}"


def test_a_violation_is_printed_once(server: HubProcess) -> None:
    bad = user(server, "create", "--email", "bad")
    assert bad.stderr.splitlines() == ["hub: INVALID_ARGUMENT",
                                       "  email: not a valid email address"]
    both = user(server, "create", "--email", "bad", "--password", stdin="short\n")
    assert both.stderr.splitlines() == ["hub: INVALID_ARGUMENT",
                                        "  email: not a valid email address",
                                        "  password: must be 8 to 1024 characters"]
    # Without violations the details are the message.
    missing = user(server, "get", UNKNOWN_ID)
    assert missing.stderr.splitlines() == [f"hub: NOT_FOUND: user {UNKNOWN_ID} not found"]


# -- import, row by row ------------------------------------------------------------------------


def test_import_refuses_bad_rows_at_their_file_index(server: HubProcess, tmp_path: Path) -> None:
    jsonl_file = tmp_path / "mixed.jsonl"
    jsonl_file.write_text(
        "{broken\n"                                                  # 0: refused here
        '{"email": "a@example.com"}\n'                               # 1
        '{"email": "b@example.com", "status": "foo"}\n'              # 2: refused here
        "\n"
        '{"email": "A@example.com"}\n'                               # 3: refused by the hub
        "[1, 2]\n"                                                   # 4: refused here
        '{"email": "c@example.com", "name": 5}\n'                    # 5: refused here
        '{"email": "not-an-email"}\n'                                # 6: refused by the hub
        '{"email": "d@example.com", "status": "Inactive"}\n'         # 7
    )
    result = user(server, "import", str(jsonl_file))
    assert result.returncode == 1
    assert result.stdout == "created 2, refused 6\n"
    refused = [line for line in result.stderr.splitlines() if line.startswith("row ")]
    assert refused == [
        "row 0: line 1: not valid JSON (Expecting property name enclosed in double quotes)",
        'row 2 (status): status: unknown "foo"; allowed: active, inactive',
        # Rows 1 and 2 the hub saw as its rows 0 and 1: its indexes are mapped to the file's.
        "row 3 (email): email A@example.com is already registered",
        "row 4: line 6: not a JSON object",
        "row 5 (name): name: must be a string, not 5",
        "row 6 (email): email: not a valid email address",
    ]
    # The progress bar knew the total beforehand (so it has an ETA).
    assert "8/8 [" in result.stderr
    by_email = {u["email"]: u["status"] for u in json_lines(ok(user(server, "list")))}
    assert by_email == {"a@example.com": "USER_STATUS_ACTIVE",
                        "d@example.com": "USER_STATUS_INACTIVE"}


def test_import_from_stdin_counts_rows_without_a_total(server: HubProcess) -> None:
    result = user(server, "import", "-", "--format", "jsonl",
                  stdin='{"email": "sam@example.com"}\n{"email": "sue@example.com"}\n')
    assert result.returncode == 0, result.stderr
    assert result.stdout == "created 2, refused 0\n"
    assert "2 rows [" in result.stderr and not re.search(r"\d+/\d+ \[", result.stderr)


def test_import_csv_without_an_email_column_is_one_line(server: HubProcess,
                                                        tmp_path: Path) -> None:
    csv_file = tmp_path / "users.csv"
    csv_file.write_text("mail,name\nada@example.com,Ada\n")
    result = user(server, "import", str(csv_file))
    assert result.returncode == 1
    assert result.stderr.strip() == f"hub: {csv_file}: the CSV header has no email column" \
                                    " (it has: mail, name)"
    assert json_lines(ok(user(server, "list"))) == []


def test_list_into_a_closed_pipe_stops_quietly(server: HubProcess, tmp_path: Path) -> None:
    # More than a pipe holds (64 KiB), so the command is still writing when its reader goes.
    csv_file = tmp_path / "many.csv"
    csv_file.write_text("email\n" + "".join(f"u{i}@example.com\n" for i in range(1000)))
    assert ok(user(server, "import", str(csv_file))).strip() == "created 1000, refused 0"
    listing = subprocess.Popen(
        [sys.executable, "-m", "hub", "user", "list", "--target", server.target],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    assert listing.stdout is not None and listing.stderr is not None
    assert json.loads(listing.stdout.readline())["email"].endswith("@example.com")
    listing.stdout.close()  # `| head -1`
    assert listing.wait(60) == 1
    assert listing.stderr.read() == ""


# -- watch --------------------------------------------------------------------------------------


class Watch:
    """`hub watch ...` as a subprocess; its stdout lines read as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            dying_with_parent([sys.executable, "-m", "hub", *args]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def event(self, timeout: float = 30) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no event from hub watch within {timeout}s")
        event: dict[str, Any] = json.loads(line)
        return event

    def wait_catching(self, signum: int, timeout: float = 30) -> None:
        """Until the process has a handler for `signum` (Linux: SigCgt in /proc)."""
        deadline = time.monotonic() + timeout
        while True:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            match = re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE)
            if match and int(match.group(1), 16) >> (signum - 1) & 1:
                return
            assert self.proc.poll() is None, "hub watch exited"
            assert time.monotonic() < deadline, f"hub watch never caught signal {signum}"
            time.sleep(0.02)

    def stop(self, signum: int) -> tuple[int, str]:
        """Sends `signum`; the exit status and everything it wrote to stderr."""
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(30)
        finally:
            self.proc.kill()
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


RESUME = re.compile(r"^hub: stopped; resume with --resume-token (\S+)$", re.MULTILINE)


def test_watch_prints_its_resume_token_on_sigterm(server: HubProcess) -> None:
    ok(user(server, "create", "--email", "ada@example.com"))
    watch = Watch("watch", "--snapshot", "--target", server.target)
    assert watch.event()["user"]["email"] == "ada@example.com"  # the snapshot: it is live
    ok(user(server, "create", "--email", "bob@example.com"))
    assert watch.event()["user"]["email"] == "bob@example.com"
    code, stderr = watch.stop(signal.SIGTERM)
    assert code == 0, stderr
    token = RESUME.search(stderr)
    assert token, stderr

    # The token resumes after bob: the next watch starts with what came since.
    ok(user(server, "create", "--email", "cy@example.com"))
    resumed = Watch("--target", server.target, "watch", "--resume-token", token.group(1))
    event = resumed.event()
    assert (event["type"], event["user"]["email"]) == ("EVENT_TYPE_CREATED", "cy@example.com")
    code, stderr = resumed.stop(signal.SIGTERM)
    assert code == 0 and RESUME.search(stderr), stderr


def test_watch_prints_its_resume_token_on_ctrl_c(server: HubProcess) -> None:
    ok(user(server, "create", "--email", "ada@example.com"))
    watch = Watch("--target", server.target, "watch", "--snapshot")
    assert watch.event()["type"] == "EVENT_TYPE_SNAPSHOT"
    ok(user(server, "create", "--email", "bob@example.com"))
    assert watch.event()["type"] == "EVENT_TYPE_CREATED"
    code, stderr = watch.stop(signal.SIGINT)
    assert code == 0 and RESUME.search(stderr), stderr
    assert "Traceback" not in stderr


def test_watch_stopped_before_any_response_says_so() -> None:
    watch = Watch("watch", "--target", f"127.0.0.1:{free_port()}")  # nothing there: it retries
    watch.wait_catching(signal.SIGTERM)
    code, stderr = watch.stop(signal.SIGTERM)
    assert code == 0
    assert stderr == "hub: stopped before any response; no resume token yet\n"
