"""Tunables, each with the reason for its value. Environment variables override a few."""

from __future__ import annotations

import os

# Values whose serialized size is below this travel inside messages; larger ones go to the
# node's shared-memory store. 100 KiB is where a copy starts to cost more than a mapping.
INLINE_THRESHOLD = int(os.environ.get("SHOAL_INLINE_THRESHOLD", 100 * 1024))

# Largest single frame a socket accepts. Bigger values move through shared memory or in
# chunks, so nothing legitimate comes close; a peer claiming more is dropped before any
# allocation (the transport checks it while reading the length prefix).
MAX_FRAME_SIZE = 256 * 1024 * 1024
# Most frames one message may have: routing ids, magic, signature, header, buffers.
MAX_FRAMES = 4096

# How long a lease on an idle worker is kept by its owner before it is given back. Long
# enough that a driver looping submit-then-get keeps its worker, short enough that other
# drivers get a turn. The node manager can also ask for a lease back at once.
IDLE_LEASE_SECONDS = 0.5

# Tasks pushed to one leased worker before its first result comes back. More than one lets
# a worker start its next task without waiting a round trip (throughput of small tasks
# rises by half). A worker that blocks in `get` hands its queued tasks back (they could be
# what it waits for), and its owner then pushes it nothing more until it is done.
MAX_TASKS_IN_FLIGHT_PER_WORKER = 4

# Idle workers beyond the node's CPU count are stopped after this many seconds.
IDLE_WORKER_SECONDS = 10.0

# Number of times a task is retried after its worker died, unless options say otherwise.
DEFAULT_MAX_RETRIES = 3

# How long shutdown waits for a process to exit after SIGTERM before SIGKILL.
KILL_GRACE_SECONDS = 2.0

# How long `init()` waits for a head it started to be ready.
START_TIMEOUT_SECONDS = float(os.environ.get("SHOAL_START_TIMEOUT", 30))

# A lease request that waited this long on a full node asks the control store again for a
# node with room (the cluster may have freed some elsewhere since it was placed).
RESPILL_SECONDS = 0.2

# Client-server mode: a client pings the head every CLIENT_TIMEOUT_SECONDS / 5 (at most
# every 2 s); the head drops a client it has not heard from for this long, and a client
# that has not heard from the head for this long fails what it waits for (disconnected).
# Shorter losses are ridden out: TCP keeps the connection and delivers what was queued,
# and a connection that breaks meanwhile is resumed (the grace period is this timeout).
CLIENT_TIMEOUT_SECONDS = float(os.environ.get("SHOAL_CLIENT_TIMEOUT", 30))
CLIENT_PING_SECONDS = min(2.0, CLIENT_TIMEOUT_SECONDS / 5)

# Health checks between the head and its nodes. A node reports to the head every
# HEALTH_CHECK_PERIOD_SECONDS (its resources: a heartbeat) and the head answers each report.
# A node is declared dead when HEALTH_CHECK_FAILURE_THRESHOLD reports in a row are missing
# (a broken link is resumed meanwhile: a node's session with the head survives a reset
# connection); a node that hears nothing from the head for as long treats the head as lost.
# Ray checks every 3 s and allows 5 misses; a report is cheaper here than a gRPC health
# check, so the period is shorter: a SIGKILLed or cut-off node is declared dead in 5-6 s.
# TCP retransmits with backoff after a link outage (0.2, 0.6, 1.4, 3 s ...), so a link that
# is down for more than about 2 s may come back too late for this threshold: raise it where
# links flap. SHOAL_NODE_TIMEOUT (seconds), if set, overrides period x threshold.
HEALTH_CHECK_PERIOD_SECONDS = float(os.environ.get("SHOAL_HEALTH_CHECK_PERIOD", 1.0))
HEALTH_CHECK_FAILURE_THRESHOLD = int(os.environ.get("SHOAL_HEALTH_CHECK_FAILURE_THRESHOLD", 5))
if HEALTH_CHECK_PERIOD_SECONDS <= 0 or HEALTH_CHECK_FAILURE_THRESHOLD < 1:
    raise ValueError(
        "SHOAL_HEALTH_CHECK_PERIOD must be > 0 and SHOAL_HEALTH_CHECK_FAILURE_THRESHOLD >= 1, "
        f"got {HEALTH_CHECK_PERIOD_SECONDS} and {HEALTH_CHECK_FAILURE_THRESHOLD}"
    )
NODE_TIMEOUT_SECONDS = float(
    os.environ.get(
        "SHOAL_NODE_TIMEOUT", HEALTH_CHECK_PERIOD_SECONDS * HEALTH_CHECK_FAILURE_THRESHOLD
    )
)

# A node that lost the head (or was declared dead by it) kills its workers at once and then
# tries to join the head again as a new node (a new node id) for this long before it exits:
# a head restarted at the same address, or a link that comes back, gets the machine back.
# Ray's raylet waits 60 s for its GCS to come back.
NODE_REJOIN_SECONDS = float(os.environ.get("SHOAL_NODE_REJOIN_TIMEOUT", 60))

# Where a head keeps what a restarted head recovers (its detached actors), if set: see
# _head_state.py. Give it the same directory (and the same --key-file, so that the nodes
# can join again) when starting the head again.
HEAD_STATE_DIR = os.environ.get("SHOAL_HEAD_STATE_DIR", "")

# Lineage: an owner keeps the spec of each finished task whose result lives in a node's
# store (and could be lost with that node) while the result is referenced, so that it can
# run the task again (Ray's lineage reconstruction). At most this many bytes of specs (their
# inline arguments, mostly) per owner; the oldest are dropped first (Ray: max_lineage_bytes).
MAX_LINEAGE_BYTES = int(os.environ.get("SHOAL_MAX_LINEAGE_BYTES", 1 << 30))

# How many times one object may be rebuilt: the task's max_retries (default 3, 0: never);
# with max_retries=-1, this many.
MAX_OBJECT_RECONSTRUCTIONS = int(os.environ.get("SHOAL_MAX_OBJECT_RECONSTRUCTIONS", 10))

# The longest a reader waits for a lost object to be rebuilt (its task run again) before it
# gets ObjectLostError. A safety net: the owner answers, or its death is noticed, long before.
REBUILD_WAIT_SECONDS = float(os.environ.get("SHOAL_REBUILD_WAIT", 600))

# The memory monitor (see _memory_monitor.py): each node checks its memory use every
# period and, above the threshold (a fraction of the node's memory, or of its cgroup's
# limit), stops the worker of the newest retriable task. As in Ray: 250 ms, 0.95. Either
# set to 0 turns the monitor off.
DEFAULT_MEMORY_USAGE_THRESHOLD = 0.95
DEFAULT_MEMORY_MONITOR_PERIOD = 0.25

# A task whose worker the memory monitor stopped is retried (within max_retries) after
# a delay that doubles with each such stop, from the first value up to the second: memory
# takes a moment to be freed, and running it again at once would only stop it again.
OOM_RETRY_DELAY_SECONDS = 0.5
OOM_RETRY_MAX_DELAY_SECONDS = 10.0


def memory_monitor_settings() -> tuple[float, float]:
    """(threshold, period) from SHOAL_MEMORY_USAGE_THRESHOLD and
    SHOAL_MEMORY_MONITOR_PERIOD; ValueError naming the variable when one is malformed."""
    threshold = _env_float(
        "SHOAL_MEMORY_USAGE_THRESHOLD", DEFAULT_MEMORY_USAGE_THRESHOLD, "a fraction from 0 to 1"
    )
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"SHOAL_MEMORY_USAGE_THRESHOLD must be a fraction from 0 to 1 (0 turns the "
            f"memory monitor off), got {threshold!r}"
        )
    period = _env_float(
        "SHOAL_MEMORY_MONITOR_PERIOD", DEFAULT_MEMORY_MONITOR_PERIOD, "a number of seconds"
    )
    if period < 0:
        raise ValueError(f"SHOAL_MEMORY_MONITOR_PERIOD must be >= 0 seconds, got {period!r}")
    return threshold, period


def _env_float(name: str, default: float, what: str) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} must be {what}, got {text!r}") from None
