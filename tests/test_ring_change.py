"""A worker joins while calls are being set up: nothing forks twice, nothing is lost.

A node runs one worker; calls ring on it; a second worker joins (a separate
`sipcluster worker` process on the same etcd prefix), so the ring moves about half
of the Call-IDs to it.  Retransmitted INVITEs, CANCELs and the ACKs for the
487s of the calls that were ringing must still reach the first worker
(docs/architecture.md, "claims"), and new calls must reach the new worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from harness import Node, UserAgent, metric_sum, start_node

from cluster.etcd import LocalEtcd
from cluster.ring import Ring, branch_worker
from sipcore import Request, Response, make_ack, make_cancel

DOMAIN = "example.com"


def start_worker(node: Node, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a `sipcluster worker` for the node's cluster; return it and its id once
    it reports ready over the notify pipe."""
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "worker",
            "--etcd",
            node.etcd_url,
            "--etcd-prefix",
            node.prefix,
            "--data-dir",
            str(data_dir),
            "--http",
            "127.0.0.1:0",
            "--domain",
            DOMAIN,
            "--auth",
            "none",
        ],
        pass_fds=(write_end,),
        env=dict(os.environ, SIPCLUSTER_NOTIFY_FD=str(write_end)),
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    with os.fdopen(read_end) as notifications:
        for line in notifications:
            message = json.loads(line)
            if message["event"] == "ready":
                return process, message["id"]
    raise AssertionError("the worker never became ready")


def acks_received(node: Node, process: str) -> float:
    """The ACKs ``process`` of the node has received (its /metrics, via the node's)."""
    labels = {"kind": "request", "method": "ACK", "status_class": "", "process": process}
    return metric_sum(node.http_port, "sipcluster_worker_messages_received_total", labels)


def top_branch_worker(request: Request) -> str | None:
    return branch_worker((request.via.branch or "").encode())


def test_a_worker_joins_while_calls_ring(etcd_server: LocalEtcd, tmp_path: Path) -> None:
    node = start_node(
        etcd_server.url,
        tmp_path / "node",
        workers=1,
        auth="none",
        domain=DOMAIN,
    )
    joined: subprocess.Popen[bytes] | None = None
    try:

        async def scenario() -> None:
            nonlocal joined
            proxy = (node.host, node.port)
            callee = await UserAgent("callee", DOMAIN).start(proxy)
            assert (await callee.register()).status == 200
            callers = [await UserAgent(f"caller{i}", DOMAIN).start(proxy) for i in range(12)]
            ringing: list[tuple[UserAgent, Request, Request]] = []
            for caller in callers:
                invite = caller.request("INVITE", f"sip:{callee.aor}")
                caller.send(invite)
                received = await callee.receive_request("INVITE")
                callee.answer(received, 180)
                assert (await caller.receive_response(180)).status == 180
                ringing.append((caller, invite, received))
            first_worker = top_branch_worker(ringing[0][2])
            assert first_worker is not None

            joined, second_worker = await asyncio.get_running_loop().run_in_executor(
                None, start_worker, node, tmp_path / "joined"
            )
            new_ring = Ring([first_worker, second_worker])
            moved = [
                call
                for call in ringing
                if new_ring.owner_of(call[1].call_id.encode()) == second_worker
            ]
            assert moved, "some ringing calls belong to the new worker under the new ring"

            # Wait until the load balancer routes by the new ring: a new call whose
            # Call-ID the new worker owns is forwarded by the new worker.
            probe = await UserAgent("probe", DOMAIN).start(proxy)
            for attempt in range(200):
                call_id = f"probe-{attempt}@test"
                if new_ring.owner_of(call_id.encode()) != second_worker:
                    continue
                probe.send(probe.request("OPTIONS", f"sip:{callee.aor}", call_id=call_id))
                options = await callee.receive_request("OPTIONS")
                callee.answer(options, 200)
                await probe.receive_response(200)
                if top_branch_worker(options) == second_worker:
                    break
            else:
                raise AssertionError("the load balancer never used the new ring")

            # A retransmitted INVITE of a moved call is absorbed by the first worker's
            # server transaction (it answers 180 again) and is not forked twice.
            caller, invite, _ = moved[0]
            caller.send(invite)
            assert (await caller.receive_response(180)).status == 180
            # A CANCEL of each moved call reaches the INVITE's transaction, and so
            # does the ACK for its 487 (RFC 3261 17.1.1.3: it belongs to the
            # INVITE's server transaction, 9.1, 17.2.1), on the first worker.
            loop = asyncio.get_running_loop()
            acks_before = await loop.run_in_executor(None, acks_received, node, "worker-0")
            for caller, invite, received in moved:
                caller.send(make_cancel(invite))
                assert (await caller.receive_response(200, method="CANCEL")).status == 200
                cancel = await callee.receive_request("CANCEL")
                assert cancel.call_id == invite.call_id
                callee.answer(cancel, 200)
                callee.answer(received, 487)
                final = await caller.receive_response(300, method="INVITE")
                assert final.status == 487
                caller.send(make_ack(invite, final))
            # A last request of a moved call follows the ACKs down the same ordered
            # pipes (load balancer -> new owner -> first worker): once it is
            # through, every ACK before it has been handled.
            caller, invite, _ = moved[-1]
            caller.send(caller.request("OPTIONS", f"sip:{callee.aor}", call_id=invite.call_id))
            leftovers: list[Request | Response] = []
            while not isinstance(message := await callee.receive(), Request) or (
                message.method != "OPTIONS"
            ):
                leftovers.append(message)
            assert top_branch_worker(message) == first_worker
            callee.answer(message, 200)
            assert (await caller.receive_response(200, method="OPTIONS")).status == 200
            acks = await loop.run_in_executor(None, acks_received, node, "worker-0")
            assert acks - acks_before == len(moved)
            # The callee never saw a second INVITE for any of these calls.
            while not callee.inbox.empty():
                leftovers.append(callee.inbox.get_nowait())
            assert not [m for m in leftovers if getattr(m, "method", None) == "INVITE"]
            for agent in (*callers, callee, probe):
                await agent.close()

        asyncio.run(scenario())
    finally:
        if joined is not None:
            joined.send_signal(signal.SIGINT)  # leave at once (SIGTERM would drain)
            assert joined.wait(30) == 0
        assert node.stop() == 0
