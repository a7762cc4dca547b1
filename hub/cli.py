"""`hub` command line: it parses flags and calls one function; nothing else lives here.

    hub serve [--host H] [--port P] [--redis-url URL] [--workers N]
    hub user create --email ada@example.com --name Ada
    hub user import users.csv            # or .jsonl; streams through BulkCreateUsers
    hub watch [--user ID ...]            # live changes, one JSON line each, resuming by itself
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import getpass
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from hub.logs import configure as configure_logging
from hub.settings import Settings

_STATUSES = {"active": 1, "inactive": 2}
_PARSE = {"str": str, "int": int, "float": float}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        result: int = args.run(args)
    except ValueError as exc:  # bad settings from the environment
        print(f"hub: {exc}", file=sys.stderr)
        return 2
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hub", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(title="commands")

    serve = commands.add_parser("serve", help="run a hub server")
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

    user = commands.add_parser("user", help="manage users on a running hub")
    user.add_argument("--target", default=os.environ.get("HUB_TARGET", "localhost:50051"),
                      help="hub address (HUB_TARGET, default localhost:50051)")
    user.add_argument("--timeout", type=float, default=5.0, help="deadline per call in seconds")
    _credential_flags(user)
    ops = user.add_subparsers(title="user commands")

    create = ops.add_parser("create", help="create a user")
    create.add_argument("--email", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--status", choices=sorted(_STATUSES), default="active")
    create.add_argument("--password", action="store_true",
                        help="prompt for a password (read from stdin when not a terminal)")
    create.set_defaults(run=_user_create)

    get = ops.add_parser("get", help="show one user")
    get.add_argument("user_id")
    get.set_defaults(run=_user_get)

    update = ops.add_parser("update", help="change name, email or status")
    update.add_argument("user_id")
    update.add_argument("--email")
    update.add_argument("--name")
    update.add_argument("--status", choices=sorted(_STATUSES))
    update.add_argument("--expected-version", type=int,
                        help="apply only if the user is at this version")
    update.set_defaults(run=_user_update)

    delete = ops.add_parser("delete", help="delete a user")
    delete.add_argument("user_id")
    delete.add_argument("--expected-version", type=int)
    delete.set_defaults(run=_user_delete)

    list_ = ops.add_parser("list", help="print every user, one JSON object per line")
    list_.add_argument("--page-size", type=int, default=100)
    list_.add_argument("--after", default="", help="resume after this user id")
    list_.set_defaults(run=_user_list)

    imp = ops.add_parser("import", help="bulk-create users from a CSV or JSON-lines file")
    imp.add_argument("file", type=Path, help="CSV with a header (email,name[,password,status])"
                     " or .jsonl/.ndjson with one object per line; - reads CSV from stdin")
    imp.add_argument("--format", choices=("csv", "jsonl"), help="default: from the extension")
    imp.set_defaults(run=_user_import)

    watch = commands.add_parser("watch", help="print live changes as JSON lines")
    watch.add_argument("--target", action="append",
                       help="hub address; repeat to fail over between instances"
                            " (HUB_TARGET, default localhost:50051)")
    watch.add_argument("--user", action="append", default=[], metavar="ID",
                       help="follow only this user (repeatable); default: all users")
    watch.add_argument("--snapshot", action="store_true",
                       help="first print every followed user's current state")
    watch.add_argument("--resume-token", default="", help="resume after this token")
    _credential_flags(watch)
    watch.set_defaults(run=_watch)

    token = commands.add_parser("token", help="mint a development JWT (HS256)")
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


def _credential_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", default=os.environ.get("HUB_TOKEN", ""),
                        help="bearer JWT (HUB_TOKEN); without TLS only to a loopback target")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's roots")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server certificate")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")


def _credentials(args: argparse.Namespace) -> Any:
    from hub.client import Credentials

    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path else None

    return Credentials(token=args.token, tls=args.tls, tls_ca=read(args.tls_ca),
                       tls_cert=read(args.tls_cert), tls_key=read(args.tls_key))


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
    from hub.rpc.supervisor import run

    settings = Settings.load({f.name: getattr(args, f.name) for f in fields(Settings)})
    configure_logging(settings.log_level, settings.log_format)
    return run(settings)


# -- user commands ------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from hub.client import UserClient

    return UserClient(args.target, timeout=args.timeout, credentials=_credentials(args))


def _print_user(user: Any) -> None:
    print(json_format.MessageToJson(user, indent=None, preserving_proto_field_name=True))


def _user_command(fn: Any) -> Any:
    """Runs a user command and turns a typed client error into one line on stderr, exit 1."""

    def run(args: argparse.Namespace) -> int:
        from hub.client import ClientError

        try:
            with _client(args) as client:
                fn(client, args)
        except ClientError as exc:
            print(f"hub: {exc.code.name}: {exc.details}", file=sys.stderr)
            for field, description in exc.violations:
                print(f"  {field}: {description}", file=sys.stderr)
            return 1
        except ImportFileError as exc:
            print(f"hub: {exc}", file=sys.stderr)
            return 1
        return 0

    return run


@_user_command
def _user_create(client: Any, args: argparse.Namespace) -> None:
    password = ""
    if args.password:
        password = (getpass.getpass("password: ") if sys.stdin.isatty()
                    else sys.stdin.readline().rstrip("\n"))
    _print_user(client.create_user(args.email, args.name, password, _STATUSES[args.status]))


@_user_command
def _user_get(client: Any, args: argparse.Namespace) -> None:
    _print_user(client.get_user(args.user_id))


@_user_command
def _user_update(client: Any, args: argparse.Namespace) -> None:
    status = _STATUSES[args.status] if args.status else None
    _print_user(client.update_user(args.user_id, email=args.email, name=args.name, status=status,
                                   expected_version=args.expected_version))


@_user_command
def _user_delete(client: Any, args: argparse.Namespace) -> None:
    client.delete_user(args.user_id, expected_version=args.expected_version)
    print(f"deleted {args.user_id}")


@_user_command
def _user_list(client: Any, args: argparse.Namespace) -> None:
    for user in client.list_users(page_size=args.page_size, page_token=args.after):
        _print_user(user)


class ImportFileError(Exception):
    """The import file cannot be read: nothing was imported."""


def _format_of(path: Path, fmt: str | None) -> str:
    return fmt or ("jsonl" if path.suffix in (".jsonl", ".ndjson", ".json") else "csv")


def check_import_file(path: Path, fmt: str | None = None) -> None:
    """Reads a JSON-lines file once before anything is sent: a broken line refuses the whole
    file rather than leaving it half imported. (CSV has no such failure; stdin can't be
    read twice.)"""
    if str(path) == "-":
        return
    if not path.is_file():
        raise ImportFileError(f"cannot read {path}: no such file")
    if _format_of(path, fmt) != "jsonl":
        return
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ImportFileError(f"{path} line {number}: not valid JSON ({exc.msg})") \
                    from None
            if not isinstance(row, dict):
                raise ImportFileError(f"{path} line {number}: not a JSON object")


def read_rows(path: Path, fmt: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows of an import file as dicts; CSV needs a header naming its columns."""
    with (sys.stdin if str(path) == "-" else path.open(newline="")) as f:
        if _format_of(path, fmt) == "csv":
            yield from csv.DictReader(f)
        else:
            for line in f:
                if line.strip():
                    yield json.loads(line)


@_user_command
def _user_import(client: Any, args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from hub.api.user.v1.user_service_pb2 import CreateUserRequest

    def requests() -> Iterator[CreateUserRequest]:
        for row in tqdm(read_rows(args.file, args.format), unit=" rows", file=sys.stderr):
            status = str(row.get("status") or "active").lower()
            yield CreateUserRequest(
                email=str(row.get("email") or ""), name=str(row.get("name") or ""),
                password=str(row.get("password") or ""),
                status=_STATUSES.get(status, -1),  # type: ignore[arg-type]
            )

    check_import_file(args.file, args.format)
    response = client.bulk_create(requests())
    for err in response.errors:
        where = f" ({err.field})" if err.field else ""
        print(f"row {err.index + 1}{where}: {err.message}", file=sys.stderr)
    print(f"created {response.created_count}, refused {len(response.errors)}")


def _watch(args: argparse.Namespace) -> int:
    from hub.client import ClientError, ContinuityLost, SyncFeed

    targets = args.target or [os.environ.get("HUB_TARGET", "localhost:50051")]
    feed = SyncFeed(targets, args.user, resume_token=args.resume_token, snapshot=args.snapshot,
                    credentials=_credentials(args))

    async def run() -> None:
        async with feed:
            await follow()

    async def follow() -> None:
        async for item in feed:
            if isinstance(item, ContinuityLost):
                print(f"hub: continuity lost ({item.reason}): {item.message}; a snapshot"
                      " follows", file=sys.stderr)
                continue
            for event in item.events:
                print(json_format.MessageToJson(event, indent=None,
                                                preserving_proto_field_name=True), flush=True)

    try:
        asyncio.run(run())
    except ClientError as exc:
        print(f"hub: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hub: stopped; resume with --resume-token {feed.resume_token}", file=sys.stderr)
    return 0
