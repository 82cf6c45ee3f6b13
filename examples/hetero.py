"""The three roles of nodegroups/hetero.toml: a coordinator, workers and an evaluator.

Every task finds the coordinator at ``$MNP_MAIN_NODE_ADDR:$MASTER_PORT`` (a
port mnp found free on the main node) and speaks JSON lines over TCP:

- **coordinator** (node 0, the main node): listens, waits until every other
  task of the job (``WORLD_SIZE - 1``) has said hello, then runs ``--rounds``
  rounds: it sends each worker the round number and adds up the values they
  answer (``rank * (round + 1)``). It sends the evaluator the worker ranks, the
  rounds and the total, tells the workers to stop and waits for their goodbye,
  prints the total and the evaluator's verdict, and exits 0 if the evaluator
  agreed (1 otherwise). Exiting ends the job: mnp tears down whatever is left.
- **worker** (any number of tasks, any nodes): answers rounds until told to
  stop, prints how many it answered, says goodbye and exits 0.
- **evaluator**: recomputes the total from the worker ranks and rounds on its
  own, answers whether it matches, and exits 1 if it does not.

A task that cannot reach the coordinator within ``--connect-timeout`` exits 3;
the definition's ``on_child_failure = "terminate"`` then ends the job.

    mnp run nodegroups/hetero.toml
    mnp run nodegroups/hetero.toml --param rounds=10
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any


class Peer:
    """One JSON-lines connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("r", encoding="utf-8")

    def send(self, **msg: Any) -> None:
        self.sock.sendall((json.dumps(msg) + "\n").encode())

    def recv(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("peer closed the connection")
        out: dict[str, Any] = json.loads(line)
        return out

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def me() -> dict[str, Any]:
    return {
        "rank": int(os.environ["RANK"]),
        "node": int(os.environ["MNP_NODE_INDEX"]),
        "host": os.environ.get("MNP_HOST", socket.gethostname()),
    }


def coordinator_address() -> tuple[str, int]:
    return os.environ["MNP_MAIN_NODE_ADDR"], int(os.environ["MASTER_PORT"])


def expected_total(worker_ranks: list[int], rounds: int) -> int:
    return sum(r * (k + 1) for r in worker_ranks for k in range(rounds))


def coordinator(rounds: int, accept_timeout: float) -> int:
    others = int(os.environ["WORLD_SIZE"]) - 1
    _, port = coordinator_address()
    if socket.has_dualstack_ipv6():  # MNP_MAIN_NODE_ADDR may resolve to IPv6 or IPv4
        srv = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    else:
        srv = socket.create_server(("", port))
    srv.settimeout(accept_timeout)
    workers: list[tuple[Peer, dict[str, Any]]] = []
    evaluators: list[Peer] = []
    try:
        while len(workers) + len(evaluators) < others:
            conn, _ = srv.accept()
            conn.settimeout(None)
            peer = Peer(conn)
            hello = peer.recv()
            if hello.get("role") == "evaluator":
                evaluators.append(peer)
            else:
                workers.append((peer, hello))
    except TimeoutError:
        print(
            f"coordinator: only {len(workers) + len(evaluators)} of {others} tasks "
            f"connected within {accept_timeout:g}s",
            file=sys.stderr,
        )
        return 1
    finally:
        srv.close()
    ranks = sorted(h["rank"] for _, h in workers)
    where = sorted({(h["node"], h["host"]) for _, h in workers})
    say(f"coordinator: {len(workers)} workers (ranks {ranks}) on nodes {where}")
    total = 0
    for k in range(rounds):
        for peer, _ in workers:
            peer.send(round=k)
        total += sum(int(peer.recv()["value"]) for peer, _ in workers)
    verdicts = []
    for ev in evaluators:
        ev.send(worker_ranks=ranks, rounds=rounds, total=total)
        verdicts.append(bool(ev.recv()["ok"]))
    for peer, _ in workers:
        peer.send(stop=True)
    for peer, _ in workers:
        peer.recv()  # their goodbye: they have printed and are about to exit 0
    agreed = all(verdicts)
    say(
        f"coordinator: total {total} after {rounds} rounds; "
        f"{len(verdicts)} evaluator(s) {'agree' if agreed else 'DISAGREE'}"
    )
    for peer in [p for p, _ in workers] + evaluators:
        peer.close()
    return 0 if agreed else 1


def connect(role: str, timeout: float) -> Peer:
    addr = coordinator_address()
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(addr, timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                print(
                    f"{role}: cannot reach the coordinator at {addr[0]}:{addr[1]}", file=sys.stderr
                )
                sys.exit(3)
            time.sleep(0.1)  # the coordinator may still be starting
    sock.settimeout(None)
    peer = Peer(sock)
    peer.send(role=role, **me())
    return peer


def worker(timeout: float) -> int:
    info = me()
    peer = connect("worker", timeout)
    answered = 0
    while True:
        msg = peer.recv()
        if msg.get("stop"):
            break
        peer.send(value=info["rank"] * (int(msg["round"]) + 1))
        answered += 1
    say(f"worker rank {info['rank']} on node {info['node']}: answered {answered} rounds")
    peer.send(bye=True)
    return 0


def evaluator(timeout: float) -> int:
    peer = connect("evaluator", timeout)
    msg = peer.recv()
    want = expected_total(list(msg["worker_ranks"]), int(msg["rounds"]))
    ok = want == int(msg["total"])
    peer.send(ok=ok)
    say(f"evaluator: expected {want}, coordinator has {msg['total']}: {'ok' if ok else 'WRONG'}")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("role", choices=["coordinator", "worker", "evaluator"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connect-timeout", type=float, default=60.0)
    args = ap.parse_args()
    if args.role == "coordinator":
        return coordinator(args.rounds, args.connect_timeout)
    if args.role == "worker":
        return worker(args.connect_timeout)
    return evaluator(args.connect_timeout)


if __name__ == "__main__":
    sys.exit(main())
