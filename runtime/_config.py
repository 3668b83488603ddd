"""Tunables, each with the reason for its value. Environment variables override a few."""

from __future__ import annotations

import os

# Values whose serialized size is below this travel inside messages; larger ones go to the
# node's shared-memory store. 100 KiB is where a copy starts to cost more than a mapping.
INLINE_THRESHOLD = int(os.environ.get("SHOAL_INLINE_THRESHOLD", 100 * 1024))

# Largest single frame a socket accepts. Bigger values move through shared memory or in
# chunks, so nothing legitimate comes close; a peer claiming more is dropped before any
# allocation (zmq, or the local transport, checks it while reading the length prefix).
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
