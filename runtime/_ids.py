"""Identifiers for processes, tasks, objects, actors, nodes and jobs.

An object id embeds the id of the process that owns it (its first 8 bytes), so any process
can tell who to blame when an object never arrives: the owner is known without a look-up.

    WorkerID  8 bytes   random per process (drivers are workers too)
    TaskID   16 bytes   owner WorkerID + 8-byte counter
    ObjectID 20 bytes   TaskID + 4-byte index (0 for `put`, 1.. for task returns)
    ActorID  16 bytes   random
    NodeID   16 bytes   random
    JobID     4 bytes   assigned by the control store
"""

from __future__ import annotations

import itertools
import struct

WORKER_ID_SIZE = 8
TASK_ID_SIZE = 16
OBJECT_ID_SIZE = 20

_pack_counter = struct.Struct(">Q").pack
_pack_index = struct.Struct(">I").pack


class IdFactory:
    """Makes task and object ids for one owner process. Thread-safe via the GIL-atomic counter."""

    def __init__(self, worker_id: bytes) -> None:
        self.worker_id = worker_id
        # next() on itertools.count is atomic under the GIL: safe from any thread.
        self._counter = itertools.count(1)

    def task_id(self) -> bytes:
        return self.worker_id + _pack_counter(next(self._counter))

    def put_id(self) -> bytes:
        return self.task_id() + _pack_index(0)


def return_id(task_id: bytes, index: int) -> bytes:
    """The id of the index-th return value (1-based) of a task."""
    return task_id + _pack_index(index)


def owner_of(object_id: bytes) -> bytes:
    return object_id[:WORKER_ID_SIZE]
