"""A local Redis Cluster and two hubs on it, in one command (issue 12, item 3).

    .venv/bin/python scripts/cluster.py              # 3 masters + 3 replicas, hubs on 50051/50052
    .venv/bin/python scripts/cluster.py --no-hubs    # the cluster only: prints its URL
    .venv/bin/python scripts/cluster.py --masters 4 --hub-ports 50061 50062

Every redis-server runs in cluster mode on a free loopback port, its files under a temporary
directory (removed on exit; --keep leaves it). The hubs are `hub serve` with
`--redis-url redis+cluster://127.0.0.1:P1,...`, their logs beside the nodes'. A hub that
exits (one that refuses the URL, or a port already taken) is reported with its exit status
and the end of its log; the cluster stays up. Ctrl-C stops everything, and everything dies
with this process even if it is killed.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

# Run as a file (`python scripts/cluster.py`), this directory is on sys.path, not the
# checkout: the harness lives beside hub/, not in the installed package.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.hub import HubProcess  # noqa: E402
from harness.redis import ClusterProcess, HarnessError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1, help="replicas per master")
    parser.add_argument("--no-hubs", action="store_true",
                        help="start the cluster only and print its URL")
    parser.add_argument("--hub-ports", type=int, nargs="+", default=[50051, 50052],
                        metavar="PORT", help="one hub per port (default: 50051 50052)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the data directory (nodes' files and logs) on exit")
    args = parser.parse_args(argv)

    # SIGTERM stops us the way Ctrl-C does, so the finally below runs either way; SIGINT's
    # handler is set too, as a shell's `&` starts a job with SIGINT ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    data = Path(tempfile.mkdtemp(prefix="hub-cluster-"))
    cluster = ClusterProcess(data / "redis", masters=args.masters,
                             replicas_per_master=args.replicas)
    hubs: list[HubProcess] = []
    try:
        started = time.monotonic()
        cluster.start()
        print(f"cluster ready in {time.monotonic() - started:.1f}s: "
              f"{len(cluster.masters())} masters, {len(cluster.replicas())} replicas")
        for master in cluster.masters():
            slots = sorted(s for s, port in cluster.slot_owners().items()
                           if port == master.port)
            replicas = ", ".join(r.addr for r in cluster.replicas_of(master))
            print(f"  master {master.addr} slots {_ranges(slots)}  replicas {replicas}")
        print(f"data: {data}")
        print(f"\nREDIS URL  {cluster.url}\n", flush=True)
        if not args.no_hubs:
            hubs = [HubProcess(data / "hubs", cluster.url, port=port, log_name=f"hub-{port}.log")
                    for port in args.hub_ports]
            for hub in list(hubs):
                if not _port_free(hub.port):
                    print(f"!!! port {hub.port} is taken by another process: no hub there "
                          f"(pick others with --hub-ports)")
                    hubs.remove(hub)
                    continue
                print(f"starting hub serve --port {hub.port} --redis-url {cluster.url}\n"
                      f"  log: {hub.log}")
                hub.spawn()
            for hub in hubs:
                try:
                    hub.wait_serving()
                    if hub.running:
                        print(f"hub on {hub.target}: SERVING")
                except HarnessError:  # an exit is reported by the watch below
                    if hub.running:
                        print(f"hub on {hub.target}: started, but not SERVING yet "
                              f"(see {hub.log})")
        print("\nCtrl-C stops everything.", flush=True)
        _watch(cluster, hubs)
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for hub in hubs:
            hub.terminate()
        cluster.stop()
        if args.keep:
            print(f"kept {data}")
        else:
            shutil.rmtree(data, ignore_errors=True)
    return 0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _watch(cluster: ClusterProcess, hubs: list[HubProcess]) -> None:
    """Until Ctrl-C: says so, once, when a hub or a Redis node ends."""
    reported: set[int] = set()
    while True:
        for hub in hubs:
            if hub.proc is not None and not hub.running and id(hub) not in reported:
                reported.add(id(hub))
                print(f"\n!!! hub on {hub.target} EXITED with status {hub.proc.returncode}; "
                      f"the cluster stays up. End of {hub.log}:\n"
                      f"{_indent(hub.log_tail(1500))}\n", flush=True)
        for node in cluster.nodes:
            if not node.running and id(node) not in reported:
                reported.add(id(node))
                print(f"\n!!! redis-server {node.addr} EXITED; end of {node.log}:\n"
                      f"{_indent(node.log_tail(800))}\n", flush=True)
        time.sleep(0.5)


def _ranges(slots: list[int]) -> str:
    out: list[str] = []
    for slot in slots:
        if out and int(out[-1].rsplit("-", 1)[-1]) == slot - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{slot}"
        else:
            out.append(str(slot))
    return ",".join(out)


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.rstrip().splitlines())


if __name__ == "__main__":
    sys.exit(main())
