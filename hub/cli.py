"""Run a hub server, manage its users and watch their changes live.

    hub serve [--host H] [--port P] [--redis-url URL] [--workers N]
    hub user create --email ada@example.com --name Ada
    hub user import users.csv            # or .jsonl; streams through ImportUsers; re-runnable
    hub watch [--user ID ...]            # live changes, one JSON line each, resuming by itself
    hub token --sub alice                # a development JWT

This module parses flags and calls one function per command; the work is hub.rpc's (serve)
and hub.client's (everything else). Failures are one line on stderr, `hub: ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import getpass
import hashlib
import importlib.metadata
import io
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

from google.protobuf import json_format

from hub.logs import configure as configure_logging
from hub.settings import Settings

if TYPE_CHECKING:
    from hub.api.user.v1.user_service_pb2 import CreateUserRequest
    from hub.client import ClientError, Credentials, UserClient, Written

DEFAULT_TARGET: Final = "localhost:50051"
_STATUSES: Final = {"active": 1, "inactive": 2}
_PARSE = {"str": str, "int": int, "float": float}


class CliError(Exception):
    """A failure told as one line on stderr (`hub: <message>`); `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class ImportFileError(CliError):
    """The import file cannot be read (as a whole): what was not sent was not imported."""


def version() -> str:
    """The installed distribution's version; the source tree's when hub is not installed."""
    try:
        return importlib.metadata.version("hub-userfeed")
    except importlib.metadata.PackageNotFoundError:
        from hub import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_client_options(parser, args)
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        usage: argparse.ArgumentParser = getattr(args, "usage_of", parser)
        usage.print_help()
        return 2
    try:
        code = run(args)
        sys.stdout.flush()  # here, not at exit: a reader gone away is seen below
    except BrokenPipeError:
        # `hub user list | head -1`: the reader has what it wanted. Python flushes stdout
        # again at exit, so point it at devnull first (the recipe in the `signal` docs).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("hub: interrupted", file=sys.stderr)
        return 130
    except CliError as exc:
        print(f"hub: {exc}", file=sys.stderr)
        return exc.code
    except ValueError as exc:  # bad settings from the environment, an empty update
        print(f"hub: {exc}", file=sys.stderr)
        return 2
    return code


# -- the parser -----------------------------------------------------------------------------

_EPILOG = """\
client options (--target, --token, --tls, --tls-ca, --tls-cert, --tls-key, --timeout) may
come before or after the command: `hub user --token T list` and `hub user list --token T`
are the same. `hub COMMAND --help` lists a command's flags.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hub", description=__doc__.splitlines()[0], epilog=_EPILOG,
        parents=[_client_options(0, "all")],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(title="commands")

    serve = commands.add_parser("serve", help="run a hub server",
                                description="Run a hub server until SIGTERM or Ctrl-C.")
    for setting in fields(Settings):
        env = f"HUB_{setting.name.upper()}"
        help_ = f"{setting.metadata['help']} ({env}, default {setting.default!r})"
        flag = f"--{setting.name.replace('_', '-')}"
        if setting.type == "bool":
            serve.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        else:
            serve.add_argument(flag, type=_PARSE[str(setting.type)],
                               metavar=str(setting.type).upper(), help=help_)
    serve.set_defaults(run=_serve)

    # The client options at every level, each level with dests of its own (merged by
    # _client_args, the deepest level winning): a level's default would overwrite the value
    # given at the level above it, so none has one (SUPPRESS).
    user_options, leaf_options = _client_options(1), _client_options(2)
    user = commands.add_parser("user", help="manage users on a running hub",
                               description="Manage users on a running hub.",
                               parents=[user_options])
    user.set_defaults(usage_of=user)
    ops = user.add_subparsers(title="user commands")

    def user_command(name: str, help_: str, run: Callable[[argparse.Namespace], int]
                     ) -> argparse.ArgumentParser:
        command = ops.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".",
                                 parents=[leaf_options])
        command.set_defaults(run=run, client_command=True)
        return command

    def write_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--idempotency-key", metavar="KEY",
            help="makes the write safe to repeat: run again with the same KEY (within the"
                 " hub's --idempotency-window, 24 h by default) it is not applied again and"
                 " prints the first outcome; the client also retries it by itself when its"
                 " outcome is unknown (UNAVAILABLE, deadline exceeded)")
        command.add_argument(
            "--position", action="store_true",
            help="print the write's position on stderr (`hub: position T`), for"
                 " `hub watch --min-position T` on any instance")

    create = user_command("create", "create a user", _user_create)
    write_options(create)
    create.add_argument("--email", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--status", type=str.lower, choices=sorted(_STATUSES), default="active")
    create.add_argument("--password", action="store_true",
                        help="prompt for a password (read from stdin when not a terminal)")

    get = user_command("get", "show one user", _user_get)
    get.add_argument("user_id", type=_user_id, metavar="ID")

    update = user_command("update", "change name, email or status", _user_update)
    write_options(update)
    update.add_argument("user_id", type=_user_id, metavar="ID")
    update.add_argument("--email")
    update.add_argument("--name")
    update.add_argument("--status", type=str.lower, choices=sorted(_STATUSES))
    update.add_argument("--expected-version", type=int,
                        help="apply only if the user is at this version")

    delete = user_command("delete", "delete a user", _user_delete)
    write_options(delete)
    delete.add_argument("user_id", type=_user_id, metavar="ID")
    delete.add_argument("--expected-version", type=int,
                        help="delete only if the user is at this version")

    list_ = user_command("list", "print every user, one JSON object per line", _user_list)
    list_.add_argument("--page-size", type=int, default=100)
    list_.add_argument("--after", type=_user_id, default="", metavar="ID",
                       help="resume after this user id")

    imp = user_command("import", "bulk-create users from a CSV or JSON-lines file",
                       _user_import)
    imp.description = (
        "Bulk-create users from a CSV or JSON-lines file. Re-runnable: every row is sent"
        " with an idempotency key made from the file's content"
        " and the row's number, so running the same import again (after a crash, a cut"
        " connection, rows refused UNAVAILABLE) creates each row exactly once, and reports"
        " the rows an earlier run created as created. A different file, or the same file"
        " edited, gives its rows other keys. stdin cannot be read twice, so its row N's key"
        " is made from rows 0..N instead: the same input gives the same keys. The hub keeps"
        " keys for its --idempotency-window (24 h by default); a re-run after that refuses"
        " the rows already there as taken emails (never a second user).")
    imp.add_argument("file", type=Path, help="CSV with a header (email,name[,password,status])"
                     " or .jsonl/.ndjson with one object per line; - reads stdin")
    imp.add_argument("--format", choices=("csv", "jsonl"),
                     help="default: from the extension (stdin: csv)")
    imp.add_argument("--no-idempotency-keys", dest="row_keys", action="store_false",
                     help="send rows without keys: to import again, within the window, a file"
                          " whose users were deleted since (with keys, those rows would be"
                          " reported created, not created again)")
    imp.add_argument("--position", action="store_true",
                     help="print a position covering the rows created on stderr"
                          " (`hub: position T`), for `hub watch --min-position T`")

    watch = commands.add_parser(
        "watch", help="print live changes as JSON lines",
        description="Print live changes as JSON lines, resuming by itself after failures. On"
                    " Ctrl-C or SIGTERM it prints the token to resume from.",
        parents=[_client_options(2, "watch")])
    watch.add_argument("--user", type=_user_id, action="append", default=[], metavar="ID",
                       help="follow only this user (repeatable); default: all users")
    watch.add_argument("--snapshot", action="store_true",
                       help="first print every followed user's current state")
    watch.add_argument("--resume-token", default="", help="resume after this token")
    watch.add_argument("--min-position", default="", metavar="T",
                       help="print nothing until the hub has routed every event up to T (a"
                            " write's position, from --position): read your own writes")
    watch.add_argument("--no-resync", dest="resync", action="store_false",
                       help="when the token's events have left the history, print a full"
                            " snapshot instead of resyncing by state (only what changed"
                            " since, deletions included)")
    watch.set_defaults(run=_watch, client_command=True)

    token = commands.add_parser("token", help="mint a development JWT (HS256)",
                                description="Mint a development JWT (HS256).")
    token.add_argument("--secret", default=os.environ.get("HUB_JWT_SECRET", ""),
                       help="the server's --jwt-secret (HUB_JWT_SECRET)")
    token.add_argument("--sub", required=True, help="the principal")
    token.add_argument("--scope", default="users:read users:write users:subscribe",
                       help="space-separated scopes")
    token.add_argument("--ttl", type=float, default=3600, help="seconds until it expires")
    token.add_argument("--aud", default="", help="audience claim")
    token.add_argument("--iss", default="", help="issuer claim")
    token.set_defaults(run=_token)
    return parser


class _Version(argparse.Action):
    """`--version`: `hub <version>`, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default,
                         help=help or "print hub's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"hub {version()}")
        parser.exit()


def _user_id(text: str) -> str:
    """User ids are upper-case ULIDs; the command line takes them in any case."""
    return text.strip().upper()


# -- client options -------------------------------------------------------------------------

_CLIENT_FLAGS: Final = ("target", "token", "tls", "tls_ca", "tls_cert", "tls_key", "timeout")


def _client_options(level: int, scope: str = "user") -> argparse.ArgumentParser:
    """The client options as a parent parser for one level of the command line (0: `hub`,
    1: `hub user`, 2: the command itself), into dests `client<level>_<name>` of their own.
    `scope`: the commands they are for, as their help says ("user", "watch" or "all")."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("client options (before or after the command)")

    def add(name: str, help_: str, **kwargs: Any) -> None:
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"client{level}_{name}",
                           default=argparse.SUPPRESS, help=help_, **kwargs)

    failover = {"user": "", "watch": "; repeat it to fail over between instances",
                "all": "; repeat it to let watch fail over between instances"}[scope]
    add("target", f"hub address (HUB_TARGET, default {DEFAULT_TARGET}){failover}",
        action="store" if scope == "user" else "append", metavar="HOST:PORT")
    add("token", "bearer JWT (HUB_TOKEN); without TLS, sent only to a loopback target",
        metavar="JWT")
    add("tls", "TLS with the system's root certificates", action="store_true")
    add("tls_ca", "PEM CA that signed the server certificate (implies TLS)", type=Path,
        metavar="PEM")
    add("tls_cert", "PEM client certificate (mTLS; implies TLS)", type=Path, metavar="PEM")
    add("tls_key", "PEM key of --tls-cert", type=Path, metavar="PEM")
    add("timeout", {
        "user": "deadline per call in seconds (default 5)",
        "watch": "deadline of each stream in seconds, after which it resumes (default 3600)",
        "all": "deadline per call in seconds (default 5); for watch, of each stream, after"
               " which it resumes (default 3600)"}[scope], type=float, metavar="SECONDS")
    return options


@dataclass(frozen=True)
class ClientArgs:
    """The client options as given at any level of the command line, with their defaults."""

    targets: tuple[str, ...]
    token: str
    tls: bool
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    timeout: float | None  # None: the client's own default

    @property
    def target(self) -> str:
        return self.targets[-1]  # a user command talks to one hub: the last one named

    def credentials(self) -> Credentials:
        from hub.client import Credentials

        if bool(self.tls_cert) != bool(self.tls_key):
            raise CliError("--tls-cert and --tls-key go together", 2)
        return Credentials(token=self.token, tls=self.tls,
                           tls_ca=_read_pem("--tls-ca", self.tls_ca),
                           tls_cert=_read_pem("--tls-cert", self.tls_cert),
                           tls_key=_read_pem("--tls-key", self.tls_key))


def _client_given(args: argparse.Namespace) -> dict[str, list[Any]]:
    """Each client option given, with its values from the outermost level to the innermost."""
    given: dict[str, list[Any]] = {}
    for level in range(3):
        for name in _CLIENT_FLAGS:
            key = f"client{level}_{name}"
            if hasattr(args, key):
                value = getattr(args, key)
                given.setdefault(name, []).extend(value if isinstance(value, list) else [value])
    return given


def _client_args(args: argparse.Namespace) -> ClientArgs:
    given = _client_given(args)

    def last(name: str, default: Any) -> Any:
        return given[name][-1] if name in given else default

    return ClientArgs(
        targets=tuple(given.get("target") or [os.environ.get("HUB_TARGET") or DEFAULT_TARGET]),
        token=last("token", os.environ.get("HUB_TOKEN", "")), tls=last("tls", False),
        tls_ca=last("tls_ca", None), tls_cert=last("tls_cert", None),
        tls_key=last("tls_key", None), timeout=last("timeout", None))


def _check_client_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`hub --token T serve` would ignore the token: refuse it instead."""
    if getattr(args, "run", None) is None or getattr(args, "client_command", False):
        return
    for name in _client_given(args):
        parser.error(f"--{name.replace('_', '-')} is an option of the user and watch commands")


def _read_pem(flag: str, path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {flag} {path}: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    """An OSError's reason as the rest of a sentence: `address already in use`."""
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


# -- token and serve ------------------------------------------------------------------------


def _token(args: argparse.Namespace) -> int:
    import time

    import jwt

    if not args.secret:
        print("hub: --secret (or HUB_JWT_SECRET) is required", file=sys.stderr)
        return 2
    now = int(time.time())
    claims: dict[str, Any] = {"sub": args.sub, "scope": args.scope, "iat": now,
                              "exp": now + int(args.ttl)}
    if args.aud:
        claims["aud"] = args.aud
    if args.iss:
        claims["iss"] = args.iss
    print(jwt.encode(claims, args.secret, algorithm="HS256"))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from hub.rpc.server import StartupError
    from hub.rpc.supervisor import run

    settings = Settings.load({f.name: getattr(args, f.name) for f in fields(Settings)})
    # Before anything is logged or started: a busy port is one line, not a traceback after
    # the start-up log (gRPC's own bind failure is a RuntimeError, and C-core logs it first).
    problem = bind_problem(settings.host, settings.port)
    if problem is not None:
        raise CliError(f"cannot bind {settings.address}: {problem}")
    configure_logging(settings.log_level, settings.log_format)
    try:
        return run(settings)
    except StartupError as exc:
        raise CliError(f"cannot start: {exc}", 2) from None
    except OSError as exc:  # a bind lost to a race since the check, a certificate file, ...
        where = f"{exc.filename}: " if exc.filename else ""
        raise CliError(f"{where}{_reason(exc)}" if exc.strerror else str(exc)) from None


def bind_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port (`address already in use`), or None.

    Binds as gRPC does (SO_REUSEADDR, no SO_REUSEPORT) every address `host` resolves to, and
    like gRPC is content with any one of them."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return _reason(exc)
    first: OSError | None = None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                first = first or exc
                continue
        return None
    return _reason(first) if first is not None else "the host resolves to no address"


# -- user commands ------------------------------------------------------------------------


def _print_user(user: Any) -> None:
    print(json_format.MessageToJson(user, indent=None, preserving_proto_field_name=True))


def client_error_lines(exc: ClientError) -> list[str]:
    """A failed call as stderr lines: `hub: CODE: details`, then one line per bad field.

    The server's details of an INVALID_ARGUMENT are its violations joined with "; ", so
    they are left out of the first line when the lines below say the same."""
    violations = [f"{field}: {description}" for field, description in exc.violations]
    details = exc.details
    if violations:
        rest = [] if details == "; ".join(violations) else [
            part for part in details.split("; ") if part not in violations]
        details = "; ".join(rest)
    head = f"hub: {exc.code.name}" + (f": {details}" if details else "")
    return [head, *(f"  {line}" for line in violations)]


def _user_command(fn: Callable[[UserClient, argparse.Namespace], int | None]
                  ) -> Callable[[argparse.Namespace], int]:
    """Runs a user command and turns a typed client error into lines on stderr, exit 1."""

    def run(args: argparse.Namespace) -> int:
        from hub.client import ClientError, UserClient

        client_args = _client_args(args)
        # The client's own default deadline unless --timeout was given.
        timeout: dict[str, Any] = ({} if client_args.timeout is None
                                   else {"timeout": client_args.timeout})
        try:
            with UserClient(client_args.target, credentials=client_args.credentials(),
                            **timeout) as client:
                return fn(client, args) or 0
        except ClientError as exc:
            print("\n".join(client_error_lines(exc)), file=sys.stderr)
            return 1

    return run


def _print_position(args: argparse.Namespace, written: Written[Any]) -> None:
    if args.position:
        print(f"hub: position {written.position or '(none: the hub sent no position)'}",
              file=sys.stderr)


@_user_command
def _user_create(client: UserClient, args: argparse.Namespace) -> None:
    password = ""
    if args.password:
        password = (getpass.getpass("password: ") if sys.stdin.isatty()
                    else sys.stdin.readline().rstrip("\n"))
    written = client.create_user_with_position(
        args.email, args.name, password, _STATUSES[args.status],  # type: ignore[arg-type]
        idempotency_key=args.idempotency_key)
    _print_user(written.result)
    _print_position(args, written)


@_user_command
def _user_get(client: UserClient, args: argparse.Namespace) -> None:
    _print_user(client.get_user(args.user_id))


@_user_command
def _user_update(client: UserClient, args: argparse.Namespace) -> None:
    status: Any = _STATUSES[args.status] if args.status else None
    written = client.update_user_with_position(
        args.user_id, email=args.email, name=args.name, status=status,
        expected_version=args.expected_version, idempotency_key=args.idempotency_key)
    _print_user(written.result)
    _print_position(args, written)


@_user_command
def _user_delete(client: UserClient, args: argparse.Namespace) -> None:
    written = client.delete_user_with_position(
        args.user_id, expected_version=args.expected_version,
        idempotency_key=args.idempotency_key)
    print(f"deleted {args.user_id}")
    _print_position(args, written)


@_user_command
def _user_list(client: UserClient, args: argparse.Namespace) -> None:
    for user in client.list_users(page_size=args.page_size, page_token=args.after):
        _print_user(user)


# -- user import ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """A row that was not created: its 0-based index among the file's rows (as the API's
    BulkCreateError.index), the field to blame (or "") and why."""

    index: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"row {self.index}{f' ({self.field})' if self.field else ''}: {self.message}"


class ImportFile:
    """The rows of an import file: CSV with a header, or JSON lines (blank lines are no rows).

    A row is a dict, or for JSON lines the reason its line is not an object (a broken line
    is one refused row, not a refused file). An unreadable file, or CSV that cannot be
    parsed, raises ImportFileError."""

    def __init__(self, path: Path, fmt: str | None = None) -> None:
        self.path = path
        self.stdin = str(path) == "-"
        self.format = fmt or ("jsonl" if path.suffix in (".jsonl", ".ndjson", ".json")
                              else "csv")
        self.name = "stdin" if self.stdin else str(path)

    def count(self) -> int | None:
        """Its rows, read once through (None for stdin, which cannot be read twice): CSV the
        parser cannot read is refused here, before any row is sent."""
        return None if self.stdin else sum(1 for _ in self.rows())

    def digest(self) -> str:
        """The content's identity (its format included), for its rows' idempotency keys."""
        digest = hashlib.sha256(_KEY_SCHEME + b"\0file\0" + self.format.encode() + b"\0")
        try:
            with self.path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except OSError as exc:
            raise ImportFileError(f"cannot read {self.path}: {_reason(exc)}") from None
        return digest.hexdigest()[:_KEY_DIGEST]

    def rows(self) -> Iterator[dict[str, Any] | str]:
        if self.stdin:
            yield from self._parse(sys.stdin.buffer)
            return
        try:
            f = self.path.open("rb")
        except OSError as exc:
            raise ImportFileError(f"cannot read {self.path}: {_reason(exc)}") from None
        with f:
            yield from self._parse(f)

    def _parse(self, f: IO[bytes]) -> Iterator[dict[str, Any] | str]:
        if self.format == "jsonl":
            yield from _json_lines(f)
            return
        text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
        reader = csv.DictReader(text)
        try:
            if reader.fieldnames is None:
                return  # empty: no rows
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
            if "email" not in reader.fieldnames:
                raise ImportFileError(f"{self.name}: the CSV header has no email column"
                                      f" (it has: {', '.join(reader.fieldnames)})")
            yield from reader
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ImportFileError(f"{self.name} line {reader.line_num}: {exc}") from None
        finally:
            text.detach()  # `f` is its opener's to close


# Row keys are `import-<digest>/<row>`: 128 bits of digest tell files apart, and the whole key
# stays far below the hub's 255 characters. The scheme is hashed in, so a change of how keys
# are made can never give an old key another row.
_KEY_SCHEME: Final = b"hub-import/1"
_KEY_DIGEST: Final = 32


class RowKeys:
    """The idempotency key of each row of an import, asked for every row in order (rows
    refused before sending too): `import-<digest>/<row>`.

    For a file, the digest is its content's (`ImportFile.digest`): the same file gives the same
    keys, a different or edited file others, whatever its name or place. stdin cannot be read
    twice before sending, so row N's digest is that of rows 0..N as parsed: the same input
    gives the same keys, and two inputs share keys only for identical leading rows.
    """

    def __init__(self, source: ImportFile) -> None:
        self._file = None if source.stdin else source.digest()
        self._chain = hashlib.sha256(_KEY_SCHEME + b"\0stdin\0" + source.format.encode())

    def key(self, index: int, row: Mapping[str, Any] | str) -> str:
        if self._file is not None:
            return f"import-{self._file}/{index}"
        # CSV rows may hold a None key (values past the header) and None values: made text
        # first, in an order of their own, each row framed by its length.
        text = row if isinstance(row, str) else json.dumps(
            sorted((str(k), v) for k, v in row.items()), default=str)
        data = text.encode()
        self._chain.update(len(data).to_bytes(8, "big") + data)
        return f"import-{self._chain.hexdigest()[:_KEY_DIGEST]}/{index}"


def _json_lines(f: IO[bytes]) -> Iterator[dict[str, Any] | str]:
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8-sig"))
        except UnicodeDecodeError:
            yield f"line {number}: not UTF-8 text"
            continue
        except json.JSONDecodeError as exc:
            yield f"line {number}: not valid JSON ({exc.msg})"
            continue
        if not isinstance(row, dict):
            yield f"line {number}: not a JSON object"
            continue
        yield row


def request_of(row: Mapping[str, Any]) -> CreateUserRequest | Refused:
    """The CreateUserRequest of one row, or why it cannot be sent (index -1: the caller's)."""
    from hub.api.user.v1.user_service_pb2 import CreateUserRequest

    values: dict[str, str] = {}
    for key in ("email", "name", "password", "status"):
        value = row.get(key)
        if value is None:
            value = ""
        if not isinstance(value, str):
            return Refused(-1, key, f"{key}: must be a string, not {json.dumps(value)}")
        values[key] = value
    # `hub user list` prints the API's enum names (USER_STATUS_ACTIVE): its output imports.
    status = values["status"].strip().lower().removeprefix("user_status_") or "active"
    if status not in _STATUSES:
        return Refused(-1, "status", f'status: unknown "{values["status"]}"; allowed:'
                       f" {', '.join(_STATUSES)}")
    return CreateUserRequest(email=values["email"], name=values["name"],
                             password=values["password"],
                             status=_STATUSES[status])  # type: ignore[arg-type]


def file_row(sent: Sequence[int], index: int) -> int:
    """The file row of the server's `index`-th row (it counts only the rows sent to it)."""
    if 0 <= index < len(sent):
        return sent[index]
    # Past the rows sent (a refusal that ended the stream): as many rows on from the last.
    return (sent[-1] if sent else -1) + 1 + index - len(sent)


_RERUN_HINT: Final = ("hub: run the same import again to finish it: rows an earlier run"
                      " created are reported created, not created again")
# google.rpc.Code of a row whose outcome is unknown (the store could not be reached).
_UNAVAILABLE_ROW: Final = 14


@_user_command
def _user_import(client: UserClient, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hub.client import ClientError

    source = ImportFile(args.file, args.format)
    total = source.count()
    keys = RowKeys(source) if args.row_keys else None
    sent: list[int] = []  # the file row of each row sent, in order
    refused: list[Refused] = []  # rows refused here, never sent

    def requests(bar: tqdm[Any]) -> Iterator[CreateUserRequest | tuple[CreateUserRequest, str]]:
        for index, row in enumerate(source.rows()):
            bar.update()
            key = keys.key(index, row) if keys is not None else ""
            outcome = Refused(-1, "", row) if isinstance(row, str) else request_of(row)
            if isinstance(outcome, Refused):
                refused.append(Refused(index, outcome.field, outcome.message))
                continue
            sent.append(index)
            yield (outcome, key) if key else outcome

    bar = tqdm(total=total, unit=" rows", file=sys.stderr)
    try:
        written = client.import_users_with_position(requests(bar))
    except ImportFileError as exc:  # stdin: CSV that broke halfway (a file was read first)
        raise ImportFileError(f"{exc}; the import stopped there (rows before it may have been"
                              " created)") from None
    except ClientError as exc:  # the stream itself failed: some rows may have been created
        bar.close()
        print("\n".join(client_error_lines(exc)), file=sys.stderr)
        if keys is not None:
            print(_RERUN_HINT, file=sys.stderr)
        return 1
    finally:
        bar.close()
    response = written.result
    refused += [Refused(file_row(sent, err.index), err.field, err.message)
                for err in response.errors]
    for row in sorted(refused, key=lambda r: r.index):
        print(row, file=sys.stderr)
    unread = len(sent) - response.created_count - len(response.errors)
    if unread > 0:
        print(f"hub: the hub stopped reading early: {unread} rows sent were neither created"
              " nor refused", file=sys.stderr)
    if keys is not None and (unread > 0 or any(
            err.code == _UNAVAILABLE_ROW for err in response.errors)):
        print(_RERUN_HINT, file=sys.stderr)
    if args.position:
        _print_position(args, written)
    print(f"created {response.created_count}, refused {len(refused)}")
    return 1 if refused or unread > 0 else 0


# -- watch ----------------------------------------------------------------------------------


def _watch(args: argparse.Namespace) -> int:
    # Until the event loop takes SIGTERM over, it stops the watch as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    token = args.resume_token
    try:
        from hub.client import ClientError, ContinuityLost, Resynced, SyncFeed

        client_args = _client_args(args)
        stream: dict[str, Any] = ({} if client_args.timeout is None
                                  else {"stream_timeout": client_args.timeout})
        feed = SyncFeed(client_args.targets, args.user, resume_token=args.resume_token,
                        snapshot=args.snapshot, resync=args.resync,
                        min_position=args.min_position,
                        credentials=client_args.credentials(), **stream)

        async def follow() -> None:
            async for item in feed:
                if isinstance(item, ContinuityLost):
                    action = f" (the hub recommends {item.action})" if item.action else ""
                    print(f"hub: continuity lost ({item.reason}): {item.message}{action}; a"
                          " snapshot follows", file=sys.stderr)
                    continue
                for event in item.events:
                    print(json_format.MessageToJson(event, indent=None,
                                                    preserving_proto_field_name=True),
                          flush=True)
                if isinstance(item, Resynced):
                    print(f"hub: resynced by state: the token's events had left the history;"
                          f" {len(item.updated)} users changed and {len(item.deleted)} deleted"
                          " since were printed (\"resync\": true), live from here",
                          file=sys.stderr, flush=True)

        try:
            stopped = asyncio.run(_until_signal(feed, follow))
        finally:
            token = feed.resume_token
    except KeyboardInterrupt:  # first: ClientError is not imported yet if it came early
        stopped = True
    except ClientError as exc:
        print("\n".join(client_error_lines(exc)), file=sys.stderr)
        return 1
    if stopped:
        if token:
            print(f"hub: stopped; resume with --resume-token {token}", file=sys.stderr)
        else:
            print("hub: stopped before any response; no resume token yet", file=sys.stderr)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


async def _until_signal(feed: Any, follow: Callable[[], Any]) -> bool:
    """Runs `follow()` inside `feed` until it ends (False) or SIGINT/SIGTERM cancels it (True)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    signalled = False

    def stop() -> None:
        nonlocal signalled
        signalled = True
        task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    try:
        async with feed:
            await follow()
    except asyncio.CancelledError:
        if not signalled:
            raise
    return signalled
