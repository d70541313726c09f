"""The router: which nodes are connected, which spans of blocks to send a hop to, and what the remote
chain reports back (failovers, replayed bytes, open sessions).

Ownership: the node list and each link's pending requests belong to the event loop (changed only by
its coroutines); counters and the session registry are shared with the jobs' worker threads and sit
behind one lock. `RemoteChain` sees only this narrow interface, never the coordinator itself.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from slowllm.protocol import Error, UnavailableError
from slowllm.utils._units import format_ranges

from ._keys import is_loopback
from ._links import NodeLink

JOB_MEMORY_S = 3600.0  # jobs are told of (and /status lists) bans of nodes that served them this long after


@dataclass(eq=False)
class TrackedJob:
    """A job as the router remembers it for ban notices."""

    number: int
    client: str
    kind: str
    chain: object  # its RemoteChain (`served_by`)
    notify: object = None  # tells the client while the job runs
    ended: float = 0.0
    warnings: list = field(default_factory=list)


class Router:
    def __init__(self, n_layer: int, *, wait_for_nodes: float = 60.0, request_timeout: float = 120.0):
        self.n_layer = n_layer
        self.wait_for_nodes, self.request_timeout = wait_for_nodes, request_timeout
        # Written by the event loop only, by replacing the list (never in place): worker threads that route
        # a job read one consistent snapshot, with no lock, whatever joins or leaves meanwhile.
        self.nodes: list[NodeLink] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._coverage_changed: asyncio.Event | None = None
        self._lock = threading.Lock()  # guards what worker threads touch:
        self.failovers = 0  # hops retried on another node after a failure or timeout
        self.replayed_bytes = 0  # session inputs re-sent to rebuild replacement nodes' KV caches
        self._sessions: set = set()  # open RemoteSessions (their spans say which nodes hold their caches)
        self.verify = 0.0  # fraction of hops re-run on a second node (--verify)
        self.verified_hops = 0  # hops re-run on another node
        self.disagreements = 0  # of which the two nodes disagreed (and the coordinator decided)
        self.unverifiable_hops = 0  # picked for verification, but no second node covered the span
        self.refereed_hops = 0  # hops the coordinator recomputed itself (probation, disputes, collusion checks)
        self.collusion_checks = 0  # of which the two nodes had agreed
        self.banned: list[dict] = []  # nodes proven wrong: status entries, kept for the coordinator's lifetime
        self._banned_names: set[str] = set()
        self._jobs: collections.deque = collections.deque()  # recent jobs: whom to tell when a node is banned
        self.tainted: list[dict] = []  # jobs a node banned later had served: /status.json
        self.ban_events: list[tuple] = []  # (time, node, name, reason) of each ban (the HTTP API's warnings)
        self._banned_addresses: set[str] = set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._coverage_changed = asyncio.Event()

    # ---- the node list (event loop) ---------------------------------------------------------------
    def add(self, link: NodeLink) -> None:
        self.nodes = [*self.nodes, link]
        self._coverage_changed.set()

    def remove(self, link: NodeLink) -> None:
        self.nodes = [x for x in self.nodes if x is not link]
        link.fail_all()

    def is_banned(self, name: str, address: str) -> bool:
        # loopback addresses are never banned as such: every local node shares them
        return name in self._banned_names or (address in self._banned_addresses and not is_loopback(address))

    def ban(self, link: NodeLink, reason: str) -> None:
        """A node proven wrong: out of every route at once, disconnected, refused when it comes back."""
        if link.banned:
            return
        link.banned = reason
        logging.getLogger("slowllm.nodes").warning("node %s banned: %s", link.name, reason)
        self._banned_names.add(link.name)
        if link.address:
            self._banned_addresses.add(link.address)
        self.remove(link)  # (disconnected: its entry shows no load, sessions or uptime)
        self.ban_events.append((time.time(), link, link.name, reason))
        self._tell_jobs(link, reason)
        with self._lock:
            self.banned.append(_entry(link, sessions=0))
        self._coverage_changed.set()

        async def tell() -> None:
            try:
                await link.ws.send(link.channel.pack(Error(code="banned", message=f"this node was banned: {reason}")))
                await link.ws.close(1008, "banned")
            except Exception:
                pass

        asyncio.ensure_future(tell())

    def track(self, job: "TrackedJob") -> None:
        """A job whose clients are told if a node that served it is banned within the hour."""
        with self._lock:
            self._jobs.append(job)
            while self._jobs and self._jobs[0].ended and time.time() - self._jobs[0].ended > JOB_MEMORY_S:
                self._jobs.popleft()

    def _tell_jobs(self, link: NodeLink, reason: str) -> None:
        with self._lock:
            hit = [j for j in self._jobs if link in j.chain.served_by
                   and (not j.ended or time.time() - j.ended <= JOB_MEMORY_S)]
            for j in hit:
                self.tainted.append({"job": j.number, "client": j.client, "kind": j.kind, "node": link.name,
                                     "finished": bool(j.ended)})
            del self.tainted[:-1000]
        for j in hit:
            if not j.ended and j.notify is not None:
                j.notify(f"node {link.name} that computed part of this job was banned ({reason}): results received "
                         "so far may be wrong; run the job again")
            j.warnings.append(f"node {link.name} that computed part of this job was banned: its results may be "
                              "wrong; run it again")

    # ---- shared with worker threads (locked) --------------------------------------------------------
    def record_failover(self) -> None:
        with self._lock:
            self.failovers += 1

    def record_replay(self, nbytes: int) -> None:
        with self._lock:
            self.replayed_bytes += nbytes

    def open_session(self, session) -> None:
        with self._lock:
            self._sessions.add(session)

    def close_session(self, session) -> None:
        with self._lock:
            self._sessions.discard(session)

    def sessions(self) -> list:
        with self._lock:
            return list(self._sessions)

    def record_refereed(self, node: NodeLink) -> None:
        with self._lock:
            node.refereed += 1
            self.refereed_hops += 1

    def record_collusion_check(self) -> None:
        with self._lock:
            self.collusion_checks += 1

    def unrefereed_spans(self) -> list[list[int]]:
        """Block ranges that only nodes never checked against the coordinator's own computation cover."""
        spans, start = [], None
        nodes = self.nodes
        for b in range(self.n_layer + 1):
            holders = [x for x in nodes if x.first <= b <= x.last] if b < self.n_layer else []
            unchecked = bool(holders) and not any(x.refereed for x in holders)
            if unchecked and start is None:
                start = b
            if not unchecked and start is not None:
                spans.append([start, b - 1])
                start = None
        return spans

    def record_verification(self, node: NodeLink | None, *, agreed: bool | None) -> None:
        """agreed None: no second node covered the span."""
        with self._lock:
            if agreed is None:
                self.unverifiable_hops += 1
                return
            self.verified_hops += 1
            if agreed:
                node.verified += 1
            else:
                self.disagreements += 1

    def unverified_spans(self) -> list[list[int]]:
        """Block ranges exactly one node covers: a hop there cannot be checked by recomputation on another
        node (blocks no node serves are `missing`, not listed here)."""
        spans, start = [], None
        nodes = self.nodes
        for b in range(self.n_layer):
            single = sum(x.first <= b <= x.last for x in nodes) == 1
            if single and start is None:
                start = b
            if not single and start is not None:
                spans.append([start, b - 1])
                start = None
        if start is not None:
            spans.append([start, self.n_layer - 1])
        return spans

    # ---- routing ---------------------------------------------------------------------------------
    def missing(self, first: int = 0, last: int | None = None, exclude: set = frozenset()) -> list[int]:
        last = self.n_layer - 1 if last is None else last
        covered = set()
        for node in self.nodes:
            if node not in exclude:
                covered.update(range(node.first, node.last + 1))
        return [b for b in range(first, last + 1) if b not in covered]

    def stages(self) -> int:
        """Nodes in a route through every block that takes the furthest reach at each step: how many
        stages a pipelined job keeps busy (1 while blocks are missing)."""
        block, count, nodes = 0, 0, self.nodes
        while block < self.n_layer:
            reach = max((x.last for x in nodes if x.first <= block <= x.last), default=None)
            if reach is None:
                return 1
            block, count = reach + 1, count + 1
        return max(count, 1)

    def route(self, first: int = 0, last: int | None = None,
              exclude: set = frozenset()) -> list[tuple[NodeLink, int, int]]:
        """Spans covering blocks first..last, greedy from `first`.

        Among nodes holding the next needed block: those that have not failed recently, then the least
        busy, then the one whose share of past routes is furthest below its share by reach (weighted
        round robin: a node reaching 6 blocks gets about twice the routes of one reaching 3, never all
        of them, so a node cannot draw every job by claiming a wide range), then the furthest reach, then
        the fastest. Nodes in `exclude` (failed during this operation) are never used.
        """
        last = self.n_layer - 1 if last is None else last
        spans, block, now = [], first, time.monotonic()
        while block <= last:
            holders = [x for x in self.nodes if x.first <= block <= x.last and x not in exclude]
            if not holders:
                raise UnavailableError(f"no node serves block {block}")
            def reach(x, block=block):
                return min(x.last, last) - block + 1

            best = max(holders, key=lambda x: (x.avoid_until <= now, -(x.assigned + x.load),
                                               -x.routed / reach(x), reach(x), x.speed))
            best.routed += 1
            spans.append((best, block, min(best.last, last)))
            block = best.last + 1
        return spans

    async def wait_route(self, first: int = 0, last: int | None = None, exclude: set = frozenset(),
                         notify=None, cancel: threading.Event | None = None,
                         wait: float | None = None) -> list[tuple[NodeLink, int, int]]:
        """`route`, after waiting up to --wait-for-nodes for missing blocks; `notify(text)` tells the client
        what it is waiting for (at once, then every 15 s), so a waiting job is never silent."""
        wait = self.wait_for_nodes if wait is None else wait
        deadline = time.monotonic() + wait
        told = None
        while True:
            missing = self.missing(first, last, exclude)
            if not missing:
                return self.route(first, last, exclude)
            left = deadline - time.monotonic()
            if notify is not None and wait > 0 and left > 0 and (told is None or time.monotonic() - told >= 15):
                told = time.monotonic()
                notify(f"waiting up to {left:.0f} s for a node serving blocks {format_ranges(missing)}")
            if left <= 0 or (cancel is not None and cancel.is_set()):
                raise UnavailableError(f"no node serves blocks {format_ranges(missing)} (waited "
                                       f"{wait:.0f} s): start nodes covering them.")
            self._coverage_changed.clear()
            try:  # wake on a new node, or every half second to notice a cancelled job
                await asyncio.wait_for(self._coverage_changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass

    def penalize(self, node: NodeLink) -> None:
        """A node that failed or timed out is avoided by the router for a while, longer each time."""
        node.failures += 1
        node.avoid_until = time.monotonic() + min(5.0 * 2 ** (node.failures - 1), 300.0)

    def node_status(self) -> list[dict]:
        sessions = self.sessions()
        with self._lock:
            banned = list(self.banned)
        return [_entry(x, sum(any(s.node is x for s in session.spans) for session in sessions))
                for x in sorted(self.nodes, key=lambda x: (x.first, x.last, x.name))] + banned


def _entry(x: NodeLink, sessions: int) -> dict:
    """A node's line on /status.json (a banned node keeps its last one, disconnected)."""
    live = x.connected
    return {"name": x.name, "layers": [x.first, x.last], "device": x.device, "dtype": x.dtype,
            "quantization": x.quantization, "weights_proven": x.weights_proven,
            "speed": round(x.speed, 1), "load": x.load + x.assigned if live else 0, "sessions": sessions,
            "queue": x.queue if live else 0, "batch": x.batch if live else 0.0, "rows_per_pass": x.rows if live else 0.0,
            "steps_per_message": round(x.steps_sent / x.step_messages, 2) if x.step_messages else 0.0,
            "node_sessions": x.sessions if live else 0, "failures": x.failures, "verified_hops": x.verified,
            "refereed_hops": x.refereed,
            "connected_for_s": round(time.time() - x.since, 1) if live else 0.0,
            "joined": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(x.since)),  # when this link registered
            "banned": bool(x.banned), "reason": x.banned}

