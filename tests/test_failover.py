"""Failover, end to end: real processes, the real etcd.

- A worker SIGKILLed while OPTIONS flow: requests whose Call-ID it owned are
  answered again at once when the supervisor saw the death (it revokes the
  lease), and within the lease TTL plus 1 s when nobody did (a standalone
  worker: its lease must expire).  Every registration answered 200 before the
  kill is still listed and still reachable.
- etcd stopped and restarted: the workers route from their caches, the load
  balancers by the last ring they saw, a REGISTER gets 500 with Retry-After and
  writes nothing; once etcd is back a REGISTER gets 200 again, without a restart.
- etcd frozen for longer than the lease TTL: it expires every member's lease
  when it wakes; every process writes its record again under a new lease.
- Two load balancers side by side share the workers of a node: any of them
  carries any message of a dialog.

The gaps measured are printed (run pytest with -s to see them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Node, UserAgent, cli, free_udp_and_tcp_port, members_until, start_node

from cluster.etcd import LocalEtcd, free_port
from cluster.membership import MemberView
from cluster.ring import Ring, branch_worker
from sipcore import Request, Response, make_response

DOMAIN = "example.com"
TIMERS = ["--t1", "0.1", "--timer-c", "8"]
LEASE_TTL = 3
SHORT_TTL = 2
MARGIN = 1.5
"""Slack on top of each bound, for a loaded test machine."""
ATTEMPT = 0.1
"""Seconds one probe of the load waits for its answer."""
GAP_ATTEMPT = 0.03
"""Seconds one probe after a kill waits for its answer: the resolution of the
measured gap (a proxied OPTIONS takes a few milliseconds on loopback)."""

Message = Request | Response


# ---------------------------------------------------------------- helpers


def etcd_flags(node: Node) -> list[str]:
    return ["--etcd", node.etcd_url, "--etcd-prefix", node.prefix]


def listed_aors(node: Node) -> set[str]:
    """The AoRs ``sipcluster locations --json`` lists."""
    listed = cli("locations", *etcd_flags(node), "--json")
    assert listed.returncode == 0, listed.stderr
    return {entry["aor"] for entry in json.loads(listed.stdout)}


def holder(request: Request) -> str | None:
    """The worker that forwarded ``request`` (its id is in the top Via branch)."""
    return branch_worker((request.via.branch or "").encode())


def spawn_member(
    arguments: list[str], timeout: float = 30.0
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``sipcluster ARGUMENTS`` (a worker or a load balancer) with a notify
    pipe (cluster/notify.py); return the process and its id once it says it is
    ready."""
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *arguments],
        pass_fds=(write_end,),
        env=dict(os.environ, SIPCLUSTER_NOTIFY_FD=str(write_end)),
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    deadline = time.monotonic() + timeout
    pending = b""
    try:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([read_end], [], [], deadline - time.monotonic())
            if not readable:
                break
            chunk = os.read(read_end, 4096)
            if not chunk:
                break  # it exited
            pending += chunk
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                message = json.loads(line)
                if message.get("event") == "ready":
                    return process, str(message["id"])
    finally:
        os.close(read_end)
    process.kill()
    process.wait()
    raise AssertionError(f"sipcluster {arguments[0]} never became ready")


def stop_member(process: subprocess.Popen[bytes], signum: int = signal.SIGTERM) -> int | None:
    """Stop a process this test started; its exit code (None if it had to be killed)."""
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signum)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


async def next_matching(
    agent: UserAgent, match: Callable[[Message], bool], timeout: float
) -> Message | None:
    """The next message ``agent`` receives that ``match``es (others are dropped);
    None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            message = await agent.receive(remaining)
        except TimeoutError:
            return None
        if match(message):
            return message
    return None


async def probe(
    caller: UserAgent,
    callee: UserAgent,
    call_id: str,
    timeout: float = ATTEMPT,
    via: tuple[str, int] | None = None,
) -> Request | None:
    """An OPTIONS from ``caller`` to ``callee``'s AoR (through ``via``, default the
    caller's proxy) with ``call_id``: the request as the callee received it once
    the callee's 200 is back at the caller; None when that took over ``timeout``.

    The proxy forwards an OPTIONS to the registered contact like any request
    (RFC 3261 11, 16.5); the callee answers it as a UAS (11.2).
    """
    deadline = time.monotonic() + timeout
    caller.send(caller.request("OPTIONS", f"sip:{callee.aor}", call_id=call_id), via)
    received = await next_matching(
        callee,
        lambda m: isinstance(m, Request) and m.method == "OPTIONS" and m.call_id == call_id,
        timeout,
    )
    if not isinstance(received, Request):
        return None
    callee.answer(received, 200)
    answer = await next_matching(
        caller,
        lambda m: isinstance(m, Response) and m.call_id == call_id and m.status >= 200,
        max(deadline - time.monotonic(), 0.01),
    )
    return received if isinstance(answer, Response) and answer.status == 200 else None


def owned_call_ids(ring: Ring, worker: str, tag: str) -> Iterator[str]:
    """Fresh Call-IDs that ``worker`` owns under ``ring``."""
    for number in itertools.count():
        call_id = f"{tag}-{number}@test"
        if ring.owner_of(call_id.encode()) == worker:
            yield call_id


class OptionsLoad:
    """Closed-loop OPTIONS streams, one per caller/callee pair, each with fresh
    Call-IDs: a request, its answer (or ATTEMPT seconds), the next.  Bounded in
    count and in time."""

    def __init__(self, pairs: list[tuple[UserAgent, UserAgent]], limit: int = 2000) -> None:
        self.pairs = pairs
        self.limit = limit
        self.answered = 0
        self.unanswered = 0
        self._stop = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        self._tasks = [
            asyncio.get_running_loop().create_task(self._stream(index, pair, deadline))
            for index, pair in enumerate(self.pairs)
        ]

    async def _stream(self, index: int, pair: tuple[UserAgent, UserAgent], deadline: float) -> None:
        caller, callee = pair
        for number in range(self.limit):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            if await probe(caller, callee, f"load{index}-{number}@test") is None:
                self.unanswered += 1
            else:
                self.answered += 1
                self._progress.set()

    async def answered_at_least(self, count: int, timeout: float = 10) -> None:
        """Return once ``count`` requests of the load were answered in all."""
        deadline = time.monotonic() + timeout
        while self.answered < count:
            self._progress.clear()
            await asyncio.wait_for(self._progress.wait(), max(deadline - time.monotonic(), 0))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def registered_agents(proxy: tuple[str, int], names: list[str]) -> dict[str, UserAgent]:
    """A user agent per name, each registered (200) through ``proxy``."""
    agents = {}
    for name in names:
        agent = await UserAgent(name, DOMAIN).start(proxy)
        response = await agent.register()
        assert response.status == 200, response.status
        agents[agent.aor] = agent
    return agents


def response_from(agent: UserAgent, request: Request, status: int) -> Response:
    """``agent``'s answer to ``request``, built but not sent: the To tag is the
    agent's, a 2xx to an INVITE carries its Contact (RFC 3261 12.1.1), and the
    Record-Route values are copied (12.1.1)."""
    headers: list[tuple[str, object]] = []
    if request.method == "INVITE" and status < 300:
        headers.append(("Contact", f"<{agent.contact}>"))
    response = make_response(request, status, to_tag=agent.tag, headers=headers)
    for record_route in request.get_all("Record-Route"):
        response.add("Record-Route", record_route)
    return response


def active(view: MemberView) -> set[str]:
    return set(view.active_workers())


# ------------------------------------------------------- a worker SIGKILLed


async def kill_under_load(
    node: Node, victim_of: Callable[[MemberView], str], kill: Callable[[int], None]
) -> float:
    """Register users, start OPTIONS load, SIGKILL the worker ``victim_of`` picks
    (via ``kill(pid)``) and return the gap: seconds from the kill until a request
    with a fresh Call-ID the dead worker owned is answered again.  Then every user
    registered before the kill must still be listed and reachable."""
    proxy = (node.host, node.port)
    view = await members_until(node.etcd_url, node.prefix, lambda v: len(active(v)) == 3)
    ring = Ring(view.active_workers())
    victim = victim_of(view)
    agents = await registered_agents(proxy, [f"user{i}" for i in range(8)])
    registered = set(agents)
    callers = [await UserAgent(f"caller{i}", DOMAIN).start(proxy) for i in range(4)]
    callees = list(agents.values())
    load = OptionsLoad(list(zip(callers, callees[:4], strict=True)))
    load.start(seconds=20)
    # Traffic flows before the kill.
    prober = await UserAgent("prober", DOMAIN).start(proxy)
    target = callees[4]
    before = await probe(prober, target, "before-kill@test", timeout=5)
    assert before is not None
    # The gap is measured from a ring the load balancer routes by.
    await lb_follows(prober, target, ring)
    await load.answered_at_least(100)

    killed_at = time.monotonic()
    kill(view.workers[victim].pid)
    gap = None
    fresh = owned_call_ids(ring, victim, "after-kill")
    for _ in range(1000):
        if time.monotonic() - killed_at > LEASE_TTL + 1 + 3 * MARGIN:
            break
        received = await probe(prober, target, next(fresh), timeout=GAP_ATTEMPT)
        if received is not None:
            gap = time.monotonic() - killed_at
            assert holder(received) != victim
            break
    assert gap is not None, "requests owned by the dead worker were never answered again"
    # The load flows again too.
    await load.answered_at_least(load.answered + 100)
    await load.stop()
    print(  # noqa: T201
        f"\nOPTIONS load: {load.answered} answered, {load.unanswered} lost "
        "(sent to the dead worker before the ring dropped it)"
    )

    # Every registration answered 200 before the kill is still there (RFC 3261
    # 10.3 step 8: a 200 means durable), and every user is reachable again,
    # through Call-IDs the dead worker owned.
    assert await asyncio.get_running_loop().run_in_executor(None, listed_aors, node) >= registered
    for aor, agent in agents.items():
        reached = await probe(prober, agent, next(fresh), timeout=5)
        assert reached is not None, f"{aor} is not reachable after the failover"
        assert holder(reached) != victim
    for agent in (*callers, *callees, prober):
        await agent.close()
    return gap


def test_sigkill_of_a_supervised_worker_under_load(etcd_server: LocalEtcd, tmp_path: Path) -> None:
    node = start_node(
        etcd_server.url,
        tmp_path / "node",
        workers=3,
        domain=DOMAIN,
        extra=[*TIMERS, "--lease-ttl", str(LEASE_TTL)],
    )
    try:
        gap = asyncio.run(
            kill_under_load(
                node,
                lambda view: sorted(active(view))[0],
                lambda pid: os.kill(pid, signal.SIGKILL),
            )
        )
        print(f"\nfailover gap, supervised worker SIGKILLed: {gap * 1000:.0f} ms")  # noqa: T201
        # The supervisor revokes the dead worker's lease as soon as it reaps it:
        # no waiting for the TTL.
        assert gap < 1.0 + MARGIN
        node.wait_for_log("revoked the lease of worker-")
    finally:
        assert node.stop() == 0


def test_sigkill_of_a_standalone_worker_waits_for_its_lease(
    etcd_server: LocalEtcd, tmp_path: Path
) -> None:
    node = start_node(
        etcd_server.url,
        tmp_path / "node",
        workers=2,
        domain=DOMAIN,
        extra=[*TIMERS, "--lease-ttl", str(LEASE_TTL)],
    )
    standalone: subprocess.Popen[bytes] | None = None
    try:
        standalone, standalone_id = spawn_member(
            [
                "worker",
                *etcd_flags(node),
                "--data-dir",
                str(tmp_path / "standalone"),
                "--http",
                "127.0.0.1:0",
                "--domain",
                DOMAIN,
                "--auth",
                "none",
                "--lease-ttl",
                str(LEASE_TTL),
                *TIMERS,
            ]
        )
        process = standalone

        def kill(pid: int) -> None:
            assert pid == process.pid
            process.send_signal(signal.SIGKILL)

        gap = asyncio.run(kill_under_load(node, lambda view: standalone_id, kill))
        report = f"failover gap, standalone worker SIGKILLed (lease expiry): {gap * 1000:.0f} ms"
        print("\n" + report)  # noqa: T201
        # Nobody revoked its lease: it had to expire, at most the TTL after the
        # last keepalive (sent every TTL/3).
        assert gap <= LEASE_TTL + 1 + MARGIN
        assert gap >= LEASE_TTL * 2 / 3 - 0.5
    finally:
        if standalone is not None:
            stop_member(standalone, signal.SIGKILL)
        assert node.stop() == 0


# -------------------------------------------------------- etcd goes away


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[LocalEtcd]:
    """An etcd of this test's own, which it may stop, restart and freeze."""
    server = LocalEtcd(tmp_path / "etcd", client_port=free_port(), log_path=tmp_path / "etcd.log")
    server.start()
    try:
        yield server
    finally:
        if server.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGCONT)
        server.stop()


async def register_until_ok(agent: UserAgent, seconds: float = 20) -> Response:
    """REGISTER again until a 200 (etcd is back, the worker's connection to it
    may still be reconnecting); bounded in count and time."""
    deadline = time.monotonic() + seconds
    response = None
    for _ in range(100):
        response = await agent.register()
        if response.status == 200 or time.monotonic() > deadline:
            break
        # A 500 asks for a retry later (RFC 3261 21.5.1, 20.33); this UA's pace is
        # shorter than the Retry-After, which the test already checked.
        await asyncio.sleep(0.2)
    assert response is not None
    return response


async def lb_follows(caller: UserAgent, callee: UserAgent, ring: Ring, seconds: float = 5) -> None:
    """Until the load balancer routes by ``ring``: its watch of the members may lag
    the records ``members_until`` read from etcd.  For each worker, OPTIONS with
    Call-IDs it owns until one is forwarded by it; bounded in count and time."""
    deadline = time.monotonic() + seconds
    for worker in ring.workers:
        call_ids = owned_call_ids(ring, worker, f"follows-{worker}")
        for _ in range(200):
            received = await probe(caller, callee, next(call_ids), timeout=2)
            if received is not None and holder(received) == worker:
                break
            assert time.monotonic() < deadline, f"the load balancer never routed to {worker}"
            await asyncio.sleep(0.05)  # the retry pace: the LB's watch is not observable
        else:
            raise AssertionError(f"the load balancer never routed to {worker}")


async def routed_by_last_ring(
    caller: UserAgent, callee: UserAgent, ring: Ring, since: float, seconds: float
) -> None:
    """While etcd is away: OPTIONS to ``callee`` with Call-IDs of each worker of
    ``ring`` in turn, until ``seconds`` have passed since ``since`` and each worker
    had a few.  Every one is answered (the workers route from their caches), and
    forwarded by the worker ``ring`` names (the load balancer keeps the last ring
    it saw).  Bounded in count."""
    per_worker = {worker: owned_call_ids(ring, worker, f"away-{worker}") for worker in ring.workers}
    forwarded = dict.fromkeys(ring.workers, 0)
    for number in range(5000):
        if time.monotonic() - since > seconds and min(forwarded.values()) >= 3:
            return
        worker = ring.workers[number % len(ring.workers)]
        received = await probe(caller, callee, next(per_worker[worker]), timeout=5)
        assert received is not None, "routing stopped while etcd was away"
        assert holder(received) == worker
        forwarded[worker] += 1
    raise AssertionError("etcd was away for less time than the test needs")


async def reachable_through(
    caller: UserAgent, callee: UserAgent, ring: Ring, worker: str, seconds: float
) -> float:
    """When (time.monotonic()) an OPTIONS with a Call-ID ``worker`` owns first
    reached ``callee``: tried again while the worker's cache has no binding for it
    yet (the proxy then answers at once with a final error, RFC 3261 16.5, 16.7
    step 10), bounded in count and time."""
    deadline = time.monotonic() + seconds
    fresh = owned_call_ids(ring, worker, f"reach-{callee.user}-{worker}")
    for _ in range(100):
        if await probe(caller, callee, next(fresh), timeout=2) is not None:
            return time.monotonic()
        assert time.monotonic() < deadline, f"{callee.aor} unreachable through {worker}"
        await asyncio.sleep(0.1)  # the retry pace: the cache's catch-up is not observable
    raise AssertionError(f"{callee.aor} unreachable through {worker}")


async def settled(node: Node) -> tuple[MemberView, Ring, UserAgent, UserAgent]:
    """The set-up of the etcd outage tests: both workers and the load balancer
    listed, ``callee`` registered, ``caller`` started, and the load balancer
    routing by the ring read from etcd.  Returns (members, ring, callee, caller)."""
    proxy = (node.host, node.port)
    before = await members_until(
        node.etcd_url, node.prefix, lambda v: len(active(v)) == 2 and len(v.lbs) == 1
    )
    ring = Ring(before.active_workers())
    agents = await registered_agents(proxy, ["callee"])
    callee = agents[f"callee@{DOMAIN}"]
    caller = await UserAgent("caller", DOMAIN).start(proxy)
    await lb_follows(caller, callee, ring)
    return before, ring, callee, caller


def test_etcd_restart_routing_from_cache_and_recovery(own_etcd: LocalEtcd, tmp_path: Path) -> None:
    node = start_node(
        own_etcd.url,
        tmp_path / "node",
        workers=2,
        domain=DOMAIN,
        extra=[*TIMERS, "--lease-ttl", str(SHORT_TTL)],
    )
    try:

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            before, ring, callee, caller = await settled(node)
            newcomer = await UserAgent("newcomer", DOMAIN).start((node.host, node.port))

            await loop.run_in_executor(None, own_etcd.stop)
            stopped_at = time.monotonic()
            # RFC 3261 10.3 step 7: a binding that cannot be stored fails the
            # REGISTER with 500 (nothing half-written: one Txn), with Retry-After
            # (20.33) since the outage is temporary.  A refresh and a new user alike.
            for agent in (newcomer, callee):
                refused = await agent.register()
                assert refused.status == 500, refused.status
                retry_after = refused.get("Retry-After")
                assert retry_after is not None
                assert int(str(retry_after).split(";")[0]) > 0
            # Requests are routed from the caches meanwhile, by both workers (the
            # load balancer keeps the last ring it saw), for longer than the lease
            # TTL: a clean restart renews the leases, so nobody leaves.
            await routed_by_last_ring(caller, callee, ring, stopped_at, 2 * SHORT_TTL)

            await loop.run_in_executor(None, own_etcd.start)
            outage = time.monotonic() - stopped_at
            # Nothing of the refused REGISTERs was written; the binding refreshed
            # in vain is still the one registered before.
            assert await loop.run_in_executor(None, listed_aors, node) == {f"callee@{DOMAIN}"}
            recovered = await register_until_ok(newcomer)
            assert recovered.status == 200
            assert (await register_until_ok(callee)).status == 200
            print(  # noqa: T201
                f"\netcd outage of {outage:.1f} s: REGISTER answered 200 again "
                f"{time.monotonic() - stopped_at - outage:.1f} s after etcd returned"
            )
            # The same processes, no restart; all still members.
            after = await members_until(
                node.etcd_url,
                node.prefix,
                lambda v: set(v.workers) == set(before.workers) and set(v.lbs) == set(before.lbs),
                timeout=10,
            )
            assert {w.pid for w in after.workers.values()} == {
                w.pid for w in before.workers.values()
            }
            aors = await loop.run_in_executor(None, listed_aors, node)
            assert aors == {f"callee@{DOMAIN}", f"newcomer@{DOMAIN}"}
            # The new binding reaches every worker's cache once its watch is back
            # (it retries with a backoff of at most 1 s, registry/_watched.py).
            for worker in ring.workers:
                reached_at = await reachable_through(caller, newcomer, ring, worker, seconds=4)
                print(  # noqa: T201
                    f"newcomer reachable through {worker} "
                    f"{reached_at - stopped_at - outage:.1f} s after etcd returned"
                )
            for agent in (callee, caller, newcomer):
                await agent.close()

        asyncio.run(scenario())
        assert node.process is not None
        assert node.process.poll() is None
        assert not [line for line in node.log if "restarting in" in line]
    finally:
        assert node.stop() == 0


def test_members_come_back_after_their_leases_expired(own_etcd: LocalEtcd, tmp_path: Path) -> None:
    node = start_node(
        own_etcd.url,
        tmp_path / "node",
        workers=2,
        domain=DOMAIN,
        extra=[*TIMERS, "--lease-ttl", str(SHORT_TTL)],
    )
    try:

        async def scenario() -> None:
            before, ring, callee, caller = await settled(node)

            # A frozen etcd is unreachable like a cut-off one, and unlike a
            # restarted one it keeps its lease clocks: when it wakes up, every
            # lease not refreshed for the TTL expires and the records go.
            assert own_etcd.pid is not None
            os.kill(own_etcd.pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            await routed_by_last_ring(caller, callee, ring, frozen_at, 2 * SHORT_TTL)
            os.kill(own_etcd.pid, signal.SIGCONT)
            woke_at = time.monotonic()

            # etcd never renews a lease past its expiry (it waits for the
            # revocation): every member loses its lease, and writes its record
            # again under a new one.
            members = [f"members/worker/{w}" for w in before.workers] + [
                f"members/lb/{lb}" for lb in before.lbs
            ]
            loop = asyncio.get_running_loop()
            for member in members:
                text = f"{member} written again under a new lease"
                await loop.run_in_executor(None, node.wait_for_log, text, 10)
            back = time.monotonic() - woke_at
            report = (
                f"leases expired after an etcd freeze: records rewritten {back * 1000:.0f} ms later"
            )
            print("\n" + report)  # noqa: T201
            # The same processes (same ids, same pids) are members again.
            after = await members_until(
                node.etcd_url,
                node.prefix,
                lambda v: set(v.workers) == set(before.workers) and set(v.lbs) == set(before.lbs),
                timeout=10,
            )
            assert {w.pid for w in after.workers.values()} == {
                w.pid for w in before.workers.values()
            }
            # The new leases are kept alive: the members outlive several TTLs.
            stable_since = time.monotonic()
            for number in itertools.count():
                received = await probe(caller, callee, f"renewed-{number}@test", timeout=5)
                assert received is not None
                if time.monotonic() - stable_since > 2 * SHORT_TTL:
                    break
            await members_until(
                node.etcd_url,
                node.prefix,
                lambda v: set(v.workers) == set(before.workers) and len(v.lbs) == 1,
                timeout=5,
            )
            assert (await register_until_ok(callee)).status == 200
            for agent in (callee, caller):
                await agent.close()

            # The supervisor was told the new leases: a worker that dies now
            # still leaves at once (its new lease revoked), not after the TTL.
            victim = sorted(after.workers.values(), key=lambda w: w.id)[0]
            killed_at = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            await members_until(
                node.etcd_url, node.prefix, lambda v: victim.id not in v.workers, timeout=10
            )
            assert time.monotonic() - killed_at < SHORT_TTL / 2

        asyncio.run(scenario())
        node.wait_for_log("restarting in", timeout=5)
        assert len([line for line in node.log if "restarting in" in line]) == 1
    finally:
        assert node.stop() == 0


# ---------------------------------------------- load balancers side by side


def test_two_load_balancers_carry_any_message(etcd_server: LocalEtcd, tmp_path: Path) -> None:
    node = start_node(etcd_server.url, tmp_path / "node", workers=2, domain=DOMAIN, extra=TIMERS)
    second: subprocess.Popen[bytes] | None = None
    try:
        port = free_udp_and_tcp_port()
        second, second_id = spawn_member(
            [
                "lb",
                *etcd_flags(node),
                "--listen",
                f"udp:127.0.0.1:{port}",
                "--listen",
                f"tcp:127.0.0.1:{port}",
                "--http",
                "127.0.0.1:0",
                "--data-dir",
                str(tmp_path / "lb2"),
            ]
        )

        async def scenario() -> None:
            view = await members_until(
                node.etcd_url, node.prefix, lambda v: len(v.lbs) == 2 and len(active(v)) == 2
            )
            assert second_id in view.lbs
            lb1, lb2 = (node.host, node.port), ("127.0.0.1", port)
            # Registered through different load balancers.
            callee = (await registered_agents(lb2, ["callee"]))[f"callee@{DOMAIN}"]
            caller = (await registered_agents(lb1, ["caller"]))[f"caller@{DOMAIN}"]
            assert await asyncio.get_running_loop().run_in_executor(None, listed_aors, node) == {
                f"callee@{DOMAIN}",
                f"caller@{DOMAIN}",
            }

            # Both load balancers compute the same ring: a Call-ID reaches the same
            # worker through either.
            for number in range(8):
                call_id = f"both-{number}@test"
                through_1 = await probe(caller, callee, call_id, timeout=5, via=lb1)
                through_2 = await probe(caller, callee, call_id, timeout=5, via=lb2)
                assert through_1 is not None
                assert through_2 is not None
                assert holder(through_1) == holder(through_2)

            # A call set up through LB1 towards a callee registered through LB2.
            invite = caller.request("INVITE", f"sip:{callee.aor}")
            caller.send(invite, lb1)
            received = await callee.receive_request("INVITE")
            callee.answer(received, 180)
            assert (await caller.receive_response(180)).status == 180
            # The 200 goes to LB1 rather than to the LB in its Via: the worker is
            # found from the branch (RFC 3261 16.7, 18.2.2), whichever LB carries it.
            callee.send(response_from(callee, received, 200), lb1)
            ok = await caller.receive_response(200, method="INVITE")
            assert ok.status == 200
            # The ACK through LB2: the route set is the Record-Route reversed
            # (RFC 3261 12.1.2), its LB entries are ours whichever LB we enter.
            contact = str(ok.contacts[0].uri)
            routes: list[tuple[str, object]] = [
                ("Route", value) for value in reversed(ok.get_all("Record-Route"))
            ]
            caller.send(
                caller.request(
                    "ACK",
                    contact,
                    to=f"sip:{callee.aor}",
                    to_tag=ok.to.tag,
                    cseq=invite.cseq.number,
                    call_id=invite.call_id,
                    headers=routes,
                ),
                lb2,
            )
            ack = await callee.receive_request("ACK")
            assert ack.call_id == invite.call_id
            # The callee hangs up through LB1: its route set is the Record-Route
            # of the INVITE in order (12.1.1), its target the caller's Contact.
            callee_routes: list[tuple[str, object]] = [
                ("Route", value) for value in received.get_all("Record-Route")
            ]
            callee.cseq = 100
            bye = callee.request(
                "BYE",
                str(received.contacts[0].uri),
                to=f"sip:{caller.aor}",
                to_tag=invite.from_.tag,
                call_id=invite.call_id,
                headers=callee_routes,
            )
            callee.send(bye, lb1)
            bye_received = await caller.receive_request("BYE")
            # The 200 for the BYE back through LB2.
            caller.send(response_from(caller, bye_received, 200), lb2)
            bye_ok = await callee.receive_response(200, method="BYE")
            assert bye_ok.call_id == invite.call_id
            for agent in (callee, caller):
                await agent.close()

        asyncio.run(scenario())
    finally:
        if second is not None:
            assert stop_member(second) == 0
        assert node.stop() == 0
