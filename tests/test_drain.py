"""Draining a worker under call load: no failed call, no lost registration.

A node runs two workers with short protocol timers (T1 = 100 ms, Timer C 8 s,
so the drain timeout is 14.4 s).  SIPp places a steady UDP load of calls
(INVITE, 200, ACK, a short hold, BYE) while one call rings on the worker that is
then drained with ``sipcluster drain``; the ringing call is answered after the
drain started.  Every call must complete, every binding must still be there, the
drained worker must leave, and the worker the supervisor starts in its place
must take its share of new calls.  A rolling restart (SIGHUP to ``sipcluster
run``) under the same load replaces every worker with no failed call either.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from harness import (
    Node,
    UserAgent,
    cli,
    http_get,
    members_until,
    metric_sum,
    start_node,
    status,
)
from sipp_load import CallLoad

from cluster.etcd import LocalEtcd
from cluster.membership import MemberView
from cluster.ring import Ring, branch_worker
from loadtest.sweep._sipp import read_statistics
from sipcore import Request, make_ack, make_cancel

DOMAIN = "example.com"
TIMERS = ["--t1", "0.1", "--timer-c", "8"]
CALL_RATE = 25
HOLD_MS = 300


def etcd_flags(node: Node) -> list[str]:
    return ["--etcd", node.etcd_url, "--etcd-prefix", node.prefix]


def holder(request: Request) -> str | None:
    """The worker that forwarded ``request`` (its id is in the top Via branch)."""
    return branch_worker((request.via.branch or "").encode())


def bindings(node: Node) -> set[str]:
    listed = cli("locations", *etcd_flags(node), "--json")
    assert listed.returncode == 0, listed.stderr
    return {entry["aor"] for entry in json.loads(listed.stdout)}


async def calls_under_way(load: CallLoad, name: str, at_least: int, timeout: float = 30) -> None:
    """Wait until SIPp's statistics (dumped every second) show ``at_least``
    successful calls: SIPp tells its progress only through that file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statistics = read_statistics(load.directory / f"{name}.csv")
        if statistics is not None and statistics.successful >= at_least:
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"SIPp completed fewer than {at_least} calls in {timeout} s")


async def ring_one(node: Node) -> tuple[UserAgent, UserAgent, Request, Request]:
    """A call left ringing: caller, callee, the INVITE sent and the one received."""
    proxy = (node.host, node.port)
    callee = await UserAgent("ringer", DOMAIN).start(proxy)
    assert (await callee.register()).status == 200
    caller = await UserAgent("waiter", DOMAIN).start(proxy)
    invite = caller.request("INVITE", f"sip:{callee.aor}")
    caller.send(invite)
    received = await callee.receive_request("INVITE")
    callee.answer(received, 180)
    assert (await caller.receive_response(180)).status == 180
    return caller, callee, invite, received


async def answer_and_hang_up(
    caller: UserAgent, callee: UserAgent, invite: Request, received: Request
) -> None:
    """The callee answers the ringing call; the caller's ACK and BYE follow the
    route set (RFC 3261 12.1.2) and complete it."""
    callee.answer(received, 200)
    ok = await caller.receive_response(200, method="INVITE")
    assert ok.status == 200
    contact = str(ok.contacts[0].uri)
    routes = [("Route", value) for value in reversed(ok.get_all("Record-Route"))]
    in_dialog = {"to": f"sip:{callee.aor}", "to_tag": ok.to.tag, "headers": routes}
    caller.send(caller.request("ACK", contact, cseq=invite.cseq.number, **in_dialog))
    assert (await callee.receive_request("ACK")).uri_text == contact
    caller.send(caller.request("BYE", contact, **in_dialog))
    callee.answer(await callee.receive_request("BYE"), 200)
    assert (await caller.receive_response(200, method="BYE")).status == 200


def check_load(load: CallLoad, calls: int) -> None:
    code, statistics = load.wait_calls()
    assert statistics.failed == 0, load.errors()
    assert statistics.successful == calls, (statistics, load.errors())
    assert code == 0, load.errors()


def active(view: MemberView) -> set[str]:
    return set(view.active_workers())


def test_drain_under_call_load(etcd_server: LocalEtcd, tmp_path: Path) -> None:
    node = start_node(
        etcd_server.url, tmp_path / "node", workers=2, auth="none", domain=DOMAIN, extra=TIMERS
    )
    load = CallLoad(node.uri_host, tmp_path / "sipp", domain=DOMAIN)
    calls = 16 * CALL_RATE
    try:
        load.start_callees()
        registered = bindings(node)

        async def scenario() -> dict[str, Any]:
            loop = asyncio.get_running_loop()
            caller, callee, invite, received = await ring_one(node)
            victim = holder(received)
            assert victim is not None
            before = await members_until(node.etcd_url, node.prefix, lambda v: len(active(v)) == 2)
            (survivor,) = active(before) - {victim}
            victim_http = str(before.workers[victim].http)
            # A second call rings on the same worker; it is cancelled during the drain.
            ring = Ring(sorted((victim, survivor)))
            call_id = next(
                candidate
                for candidate in (f"cancelled-{index}@test" for index in range(1000))
                if ring.owner_of(candidate.encode()) == victim
            )
            canceller = await UserAgent("canceller", DOMAIN).start((node.host, node.port))
            cancelled = canceller.request("INVITE", f"sip:{callee.aor}", call_id=call_id)
            canceller.send(cancelled)
            to_cancel = await callee.receive_request("INVITE")
            assert holder(to_cancel) == victim
            callee.answer(to_cancel, 180)
            assert (await canceller.receive_response(180)).status == 180

            load.start_calls(rate=CALL_RATE, calls=calls, hold_ms=HOLD_MS)
            await calls_under_way(load, "uac", 2 * CALL_RATE)
            drained = await loop.run_in_executor(None, cli, "drain", *etcd_flags(node), victim)
            assert drained.returncode == 0, drained.stderr
            assert f"worker {victim} is draining" in drained.stdout
            # /readyz turns 503 at once; the node as a whole stays ready.
            host, _, port = victim_http.rpartition(":")
            assert http_get(int(port), "/readyz", host)[0] == 503
            assert http_get(node.http_port, "/readyz")[0] == 200

            # The call that was ringing on the draining worker completes through it.
            await answer_and_hang_up(caller, callee, invite, received)
            # The CANCEL of the other one reaches the draining worker, which holds
            # its INVITE (RFC 3261 16.10), and so does the ACK for the 487.
            canceller.send(make_cancel(cancelled))
            assert (await canceller.receive_response(200, method="CANCEL")).status == 200
            cancel = await callee.receive_request("CANCEL")
            assert holder(cancel) == victim
            callee.answer(cancel, 200)
            callee.answer(to_cancel, 487)
            final = await canceller.receive_response(300, method="INVITE")
            assert final.status == 487
            canceller.send(make_ack(cancelled, final))
            await canceller.close()

            # The drained worker leaves once its transactions are over, and the
            # supervisor's replacement joins the ring.
            waited = await loop.run_in_executor(
                None, cli, "drain", *etcd_flags(node), victim, "--wait", "--timeout", "40"
            )
            assert waited.returncode == 0, waited.stderr
            after = await members_until(
                node.etcd_url,
                node.prefix,
                lambda v: len(active(v)) == 2 and victim not in v.workers,
            )
            (newcomer,) = active(after) - {survivor}
            # It warmed its location cache from etcd before it joined.
            newcomer_host, _, newcomer_port = str(after.workers[newcomer].http).rpartition(":")
            cached = metric_sum(
                int(newcomer_port), "sipcluster_worker_bindings", host=newcomer_host
            )
            assert cached >= len(registered) + 1
            await caller.close()

            # New calls reach the newcomer: it has its share of the Call-IDs.
            probe = await UserAgent("probe", DOMAIN).start((node.host, node.port))
            holders = set()
            for attempt in range(16):
                probe.send(
                    probe.request("OPTIONS", f"sip:{callee.aor}", call_id=f"after-{attempt}@test")
                )
                options = await callee.receive_request("OPTIONS")
                holders.add(holder(options))
                callee.answer(options, 200)
                assert (await probe.receive_response(200)).status == 200
            assert newcomer in holders
            await probe.close()
            await callee.close()
            return {"victim": victim, "newcomer": newcomer}

        outcome = asyncio.run(scenario())
        check_load(load, calls)
        assert bindings(node) >= registered | {f"ringer@{DOMAIN}"}
        node.wait_for_log(f"worker {outcome['victim']} drained in")
    finally:
        load.stop()
        assert node.stop() == 0


def test_rolling_restart_under_call_load(etcd_server: LocalEtcd, tmp_path: Path) -> None:
    node = start_node(
        etcd_server.url, tmp_path / "node", workers=2, auth="none", domain=DOMAIN, extra=TIMERS
    )
    load = CallLoad(node.uri_host, tmp_path / "sipp", domain=DOMAIN)
    calls = 20 * CALL_RATE
    try:
        load.start_callees()
        registered = bindings(node)
        original = {str(worker["id"]) for worker in status(node)["workers"]}
        assert len(original) == 2

        readiness: list[int] = []

        def replaced(view: MemberView) -> bool:
            # The node's readiness can change only when its membership does.
            readiness.append(http_get(node.http_port, "/readyz")[0])
            return len(active(view)) == 2 and not (set(view.workers) & original)

        async def scenario() -> None:
            load.start_calls(rate=CALL_RATE, calls=calls, hold_ms=HOLD_MS)
            await calls_under_way(load, "uac", 2 * CALL_RATE)
            assert node.process is not None
            os.kill(node.process.pid, signal.SIGHUP)
            # Every original worker drains and leaves; two new ones serve.
            await members_until(node.etcd_url, node.prefix, replaced, timeout=60)

        asyncio.run(scenario())
        assert len(readiness) >= 5  # two joins, two drains, two leaves (some merged)
        assert set(readiness) == {200}, readiness
        node.wait_for_log("rolling restart done")
        assert http_get(node.http_port, "/readyz")[0] == 200
        check_load(load, calls)
        assert bindings(node) >= registered
    finally:
        load.stop()
        assert node.stop() == 0


def test_a_drain_ends_at_its_timeout_and_late_responses_still_arrive(
    etcd_server: LocalEtcd, tmp_path: Path
) -> None:
    """A call still ringing when the drain timeout (here 1 s) passes: the worker
    leaves anyway; the callee's 200, whose branch names the departed worker, goes
    to another worker, which forwards it statelessly (RFC 3261 16.7: a response
    that matches no client transaction is handled as a stateless proxy would,
    16.11), and the call completes."""
    node = start_node(
        etcd_server.url,
        tmp_path / "node",
        workers=2,
        auth="none",
        domain=DOMAIN,
        extra=[*TIMERS, "--drain-timeout", "1"],
    )
    try:

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            caller, callee, invite, received = await ring_one(node)
            victim = holder(received)
            assert victim is not None
            unknown = await loop.run_in_executor(None, cli, "drain", *etcd_flags(node), "w0nosuch")
            assert unknown.returncode == 1
            assert unknown.stderr == (
                "sipcluster: no worker 'w0nosuch' in the cluster (see sipcluster status)\n"
            )
            drained = await loop.run_in_executor(
                None, cli, "drain", *etcd_flags(node), victim, "--wait", "--timeout", "30"
            )
            assert drained.returncode == 0, drained.stderr
            assert f"worker {victim} has left the cluster" in drained.stdout
            node.wait_for_log(f"worker {victim}: drain timeout")
            await answer_and_hang_up(caller, callee, invite, received)
            await caller.close()
            await callee.close()

        asyncio.run(scenario())
    finally:
        assert node.stop() == 0
