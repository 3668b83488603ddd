"""A worker process: runs tasks pushed by their owners, or hosts one actor.

Run by the head as ``python -m shoal._worker`` (environment: SHOAL_SESSION, SHOAL_HEAD,
SHOAL_WORKER_ID, SHOAL_NODE_ID). Two threads:

    main thread: task loop over the worker's own listening socket (w-<id>.sock)
        PUSH_TASK / ACTOR_CALL --> execute --> TASK_DONE back to the caller
    IO thread:   the CoreWorker (talks to the head; nested tasks, gets, actor calls)
        BECOME_ACTOR / CANCEL_TASK / EXIT from the head --> handed to the main thread

A plain task runs on the main thread, so owners reach it with no thread hand-off. A
threaded actor runs calls on a thread pool, an async actor on an asyncio loop in a second
thread; either way replies go back through the task loop, which alone owns the socket.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cloudpickle

from . import _config, _interrupts, _metrics, _shm, _worker_context
from ._core import CoreWorker
from ._ids import owner_of, return_id
from ._ioloop import IOLoop
from ._protocol import Message, MsgType, Signer
from ._refs import ObjectRef
from ._serialization import FLAG_ERROR, SerializedValue, deserialize, serialize, serialize_error
from ._session import read_key_file
from ._task_events import CANCELLED, FAILED, FINISHED, error_fields
from ._task_output import TaskOutput
from ._transport import LazyContext, Listener
from .exceptions import TaskCancelledError, TaskError

if TYPE_CHECKING:
    import asyncio
    import concurrent.futures

# asyncio, concurrent.futures and inspect are imported only by the actors that need them:
# they would add a third to every worker's start-up.

M = MsgType
STREAMING = -1
_RUNTIME_DIR = os.path.dirname(os.path.abspath(__file__))


class _Cancelled(BaseException):
    """Raised in the main thread by the SIGINT handler when its task is cancelled."""


class WorkerProcess:
    def __init__(self) -> None:
        session = os.environ["SHOAL_SESSION"]
        self.worker_id = bytes.fromhex(os.environ["SHOAL_WORKER_ID"])
        self.node_hex = os.environ.get("SHOAL_NODE_ID", "")
        key = read_key_file(os.path.join(session, "cluster.key"))
        self.loop = IOLoop()
        self.ctx = LazyContext()  # unused: no carrier needs a context
        self.listener = Listener(self.ctx, Signer(key), self._on_hello, self._on_message)
        self.address = self.listener.bind(f"ipc://{session}/w-{self.worker_id.hex()}.sock")
        node_ip = os.environ.get("SHOAL_NODE_IP")
        if node_ip:
            # Callers on other nodes reach this worker over tcp; ours keep using ipc.
            self.address += " " + self.listener.bind(f"tcp://{node_ip}:*")
        self.listener.attach(self.loop)
        self.core = CoreWorker(
            role="worker",
            head_address=os.environ["SHOAL_HEAD"],
            key=key,
            worker_id=self.worker_id,
            worker_address=self.address,
            worker_hooks=self._on_head_hook,
        )
        self.core.inline_executor = self._execute_inline
        self.core.on_block = self._bounce_queued
        _worker_context.set_core(self.core)
        self.functions: dict[bytes, Any] = {}
        self.current_task: bytes | None = None
        # The tasks the main thread is in, outermost first: a blocked task runs children
        # inline (nested), and cancelling the parent must interrupt the child it runs.
        self.main_tasks: list[bytes] = []
        self.cancelled: set[bytes] = set()
        self.actor: Any = None
        self.actor_id: bytes | None = None
        self.actor_meta: dict[str, Any] = {}
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.aloop: asyncio.AbstractEventLoop | None = None
        self.asem: asyncio.Semaphore | None = None
        self.output = TaskOutput(self.core)
        self.main_ident = threading.get_ident()
        # Guarded: a task's thread may be doing IO loop work (an actor call) when a cancel
        # comes; the exception waits until that work is done.
        signal.signal(signal.SIGINT, _interrupts.guarded(self._on_sigint))
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the head owns all shared state

    def run(self) -> None:
        sys.stdout = self.output.stream(1)
        sys.stderr = self.output.stream(2)
        try:
            self.loop.run()
        finally:
            self.output.flush()
            self.core.close()
            self.listener.close()
            self.ctx.term()
        os._exit(0)

    def _exit(self) -> None:
        self.loop.stop()

    # -- messages from the head (IO thread) --------------------------------------------
    def _on_head_hook(self, msg: Message) -> None:
        if msg.type == M.BECOME_ACTOR:
            self.loop.call_soon_threadsafe(self._become_actor, msg.body, list(msg.frames))
        elif msg.type == M.CANCEL_TASK:
            self._cancel(msg.body["t"], bool(msg.body.get("rec", True)))
        elif msg.type == M.EXIT:
            self.loop.call_soon_threadsafe(self._exit)

    def _cancel(self, task_id: bytes, recursive: bool) -> None:
        self.cancelled.add(task_id)
        if recursive:
            self.core.post(self.core.tasks.cancel_children, task_id)
        if task_id in self.main_tasks:
            signal.pthread_kill(self.main_ident, signal.SIGINT)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        cancelled = self.cancelled
        if any(t in cancelled for t in self.main_tasks):
            raise _Cancelled()

    # -- the task socket (main thread) -------------------------------------------------
    def _on_hello(self, peer: bytes, body: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _on_message(self, peer: bytes, msg: Message) -> None:
        if msg.type == M.PUSH_TASK:
            self._run_task(peer, msg.body, msg.frames)
        elif msg.type == M.ACTOR_CALL:
            self._actor_call(peer, msg.body, msg.frames)

    def _bounce_queued(self) -> None:
        """The running task blocks: hand tasks queued behind it back to their owners.

        One of them may be what it waits for. Only the main thread owns the task socket,
        and an actor's calls are never handed back (their order matters).
        """
        if self.actor is not None or threading.get_ident() != self.main_ident:
            return
        on_message = self.listener._on_message

        def bounce(peer: bytes, msg: Message) -> None:
            if msg.type == M.PUSH_TASK:
                self._reply(peer, Message(M.TASK_DONE, {"t": msg.body["t"], "bounce": True}))
            else:
                on_message(peer, msg)

        self.listener._on_message = bounce
        try:
            self.listener.handle_readable()
        finally:
            self.listener._on_message = on_message

    def _reply(self, peer: bytes, msg: Message) -> None:
        self.listener.send(peer, msg)

    # -- tasks -------------------------------------------------------------------------
    def _function(self, body: dict[str, Any], frames: Sequence[Any]) -> tuple[Any, int]:
        fn_hash = body["f"]
        if body.get("fb"):
            fn = self.functions[fn_hash] = cloudpickle.loads(frames[0])
            return fn, 1
        return self.functions[fn_hash], 0

    def _run_task(self, peer: bytes, body: dict[str, Any], frames: Sequence[Any]) -> None:
        tid = body["t"]
        try:
            fn, pos = self._function(body, frames)
        except Exception as exc:  # the function could not be unpickled here
            self._started(body)
            self._reply(peer, self._error_reply(body, exc, app_error=True))
            return
        gpu_ids = body.get("g") or []
        if gpu_ids:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)
        else:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        reply = self._execute(peer, body, frames, pos, fn, tid, body["n"], gpu_ids)
        self._reply(peer, reply)

    def _execute(
        self,
        peer: bytes,
        body: dict[str, Any],
        frames: Sequence[Any],
        pos: int,
        fn: Any,
        tid: bytes,
        name: str,
        gpu_ids: list[int],
    ) -> Message:
        ctx = _worker_context.current
        # Saved and restored: a blocked task may run its children inline, nested in here.
        saved = (
            ctx.task_id,
            ctx.task_name,
            ctx.gpu_ids,
            ctx.resources,
            ctx.fixed_resources,
            self.current_task,
        )
        fixed = body.get("res") or {}
        ctx.task_id, ctx.task_name, ctx.gpu_ids = tid, name, gpu_ids
        ctx.resources = {k: v / 10_000 for k, v in fixed.items()}
        ctx.fixed_resources = fixed
        ctx.actor_id = self.actor_id
        core = self.core
        core.job_id = int(body.get("j", 0))
        tag_token = _worker_context.output_tag.set(body.get("o"))
        borrows_before = core.borrow_adds
        on_main = threading.get_ident() == self.main_ident
        if on_main:
            self.current_task = tid
            self.main_tasks.append(tid)
        events = core.events
        if events.enabled:
            events.started(
                tid,
                body.get("at", 1),
                name,
                core.job_id,
                self.actor_id,
                body.get("ts"),
                body.get("pt"),
            )
        try:
            if tid in self.cancelled:
                raise _Cancelled()
            args, kwargs = self._decode_args(body, frames, pos)
            result = fn(*args, **kwargs)
            if body["nr"] == STREAMING:
                reply = self._stream(peer, tid, name, result)
            else:
                reply = self._encode_returns(tid, name, body["nr"], result)
            events.ended(tid, FINISHED)
            return reply
        except _Cancelled:
            message = f"task {name} was cancelled"
            events.ended(tid, CANCELLED, error_fields("TaskCancelledError", message))
            return self._plain_error_reply(body, TaskCancelledError(message))
        except BaseException as exc:
            if tid in self.cancelled:
                # Interrupted through a child it ran inline, which ended first with the
                # cancellation (its error then came up through the task's get).
                return self._plain_error_reply(
                    body, TaskCancelledError(f"task {name} was cancelled")
                )
            return self._error_reply(body, exc, app_error=True)
        finally:
            self.output.flush()
            _worker_context.output_tag.reset(tag_token)
            if on_main:
                self.current_task = saved[5]
                self.main_tasks.pop()
            self.cancelled.discard(tid)
            ctx.task_id, ctx.task_name, ctx.gpu_ids, ctx.resources, ctx.fixed_resources = saved[:5]
            if _metrics.REGISTRY.dirty:
                # The task recorded metrics: send them before its owner hears it is done.
                # An owner that then exits has this worker killed (its lease ends with
                # it), and the periodic flush would come too late.
                core.post(core.flush_events)
            if core.borrow_adds != borrows_before:
                # This task took refs it may keep (in actor state, globals): the store
                # must know before the owner hears the task is done and lets go.
                core.flush_refs_sync()

    def _execute_inline(self, body: dict[str, Any], frames: list[Any]) -> Message:
        """Run a child task in this thread for its blocked parent; returns TASK_DONE."""
        try:
            fn, pos = self._function(body, frames)
        except Exception as exc:
            return self._error_reply(body, exc, app_error=True)
        return self._execute(b"", body, frames, pos, fn, body["t"], body["n"], body.get("g") or [])

    def _decode_args(
        self, body: dict[str, Any], frames: Sequence[Any], pos: int
    ) -> tuple[list[Any], dict[str, Any]]:
        values: list[Any] = []
        fetch: list[tuple[int, ObjectRef]] = []
        for desc in body["a"]:
            kind = desc[0]
            if kind == 0:
                n = desc[1]
                parts = frames[pos : pos + n]
                pos += n
                sv = SerializedValue(parts[0], list(parts[1:]), [], desc[2])
                values.append(self.core.materialize(("v", sv)))
            elif kind == 2:
                try:
                    data, buffers, flags = _shm.read(desc[1], ObjectRef(desc[3], self.core))
                except FileNotFoundError:
                    # Spilled since the owner looked: ask the store where it is now.
                    fetch.append((len(values), ObjectRef(desc[3], self.core)))
                    values.append(None)
                    continue
                obj = deserialize(data, buffers)
                if flags & FLAG_ERROR:
                    raise obj
                values.append(obj)
            else:
                ref = ObjectRef(desc[1], self.core)
                fetch.append((len(values), ref))
                values.append(None)
        if fetch:
            from ._api import get

            got = get([ref for _, ref in fetch])
            for (i, _), v in zip(fetch, got, strict=True):
                values[i] = v
        kwnames = body.get("kw") or []
        if kwnames:
            kwargs = dict(zip(kwnames, values[len(values) - len(kwnames) :], strict=True))
            return values[: len(values) - len(kwnames)], kwargs
        return values, {}

    def _encode_returns(self, tid: bytes, name: str, nr: int, result: Any) -> Message:
        if nr == 1:
            results = [result]
        elif nr == 0:
            results = []
        else:
            if not isinstance(result, (tuple, list)) or len(result) != nr:
                raise ValueError(
                    f"task {name} declared num_returns={nr} but returned {type(result).__name__}"
                    + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
                )
            results = list(result)
        descs: list[Any] = []
        frames: list[Any] = []
        for i, value in enumerate(results):
            sv = serialize(value)
            self._add_result(return_id(tid, i + 1), sv, descs, frames)
        return Message(M.TASK_DONE, {"t": tid, "r": descs}, frames)

    def _add_result(
        self, oid: bytes, sv: SerializedValue, descs: list[Any], frames: list[Any]
    ) -> None:
        if sv.contained:
            self.core.mark_escaped(sv.contained)
        if sv.contained and sv.nbytes < _config.INLINE_THRESHOLD:
            # A result holding refs also goes to the store, with its owner as holder: the
            # store then keeps the refs' objects alive for as long as the result lives,
            # even after this worker lets go of them. Acknowledged before the reply.
            self.core.send_head(
                Message(
                    M.PUT_OBJECT,
                    {"o": oid, "f": sv.flags, "c": sv.contained, "h": owner_of(oid)},
                    sv.frames(),
                )
            )
            self.core.flush_refs_sync()
            descs.append([0, 1 + len(sv.buffers), sv.flags, sv.contained, 1])
            frames.append(sv.data)
            frames.extend(sv.buffers)
        elif sv.nbytes >= _config.INLINE_THRESHOLD:
            path = self.core.store_large(
                oid,
                sv,
                holder=owner_of(oid),
                call_site=f"returned by {_worker_context.current.task_name}",
            )
            descs.append([1, path, sv.flags])
        else:
            descs.append([0, 1 + len(sv.buffers), sv.flags, sv.contained])
            frames.append(sv.data)
            frames.extend(sv.buffers)

    def _stream(self, peer: bytes, tid: bytes, name: str, gen: Any) -> Message:
        from ._ids import return_id

        if not hasattr(gen, "__next__"):
            raise TypeError(
                f"task {name} has num_returns='streaming' but returned {type(gen).__name__}, not a generator"
            )
        index = 0
        try:
            for value in gen:
                descs: list[Any] = []
                frames: list[Any] = []
                self._add_result(return_id(tid, index + 1), serialize(value), descs, frames)
                self._reply(
                    peer, Message(M.STREAM_ITEM, {"t": tid, "i": index, "r": descs[0]}, frames)
                )
                index += 1
        except _Cancelled:
            raise
        except BaseException as exc:
            error = self._task_error(exc, name)
            self.core.events.ended(tid, FAILED, _error_fields(exc, error))
            err = serialize_error(error)
            self._reply(
                peer,
                Message(
                    M.STREAM_ITEM,
                    {"t": tid, "i": index, "r": [0, 1 + len(err.buffers), err.flags, []]},
                    err.frames(),
                ),
            )
            index += 1
        return Message(M.TASK_DONE, {"t": tid, "r": [], "n": index})

    # -- errors ------------------------------------------------------------------------
    def _task_error(self, exc: BaseException, name: str) -> TaskError:
        tb = _user_traceback(exc)
        type_name = (
            exc.cause_type_name
            if isinstance(exc, TaskError) and exc.cause_type_name
            else type(exc).__name__
        )
        message = (
            f"{name}() failed with {type_name} on node {self.node_hex[:12]} "
            f"(pid={os.getpid()}, worker={self.worker_id.hex()[:12]}):\n{tb}"
        ).rstrip()
        try:
            cause: BaseException | None = exc
            serialize(exc)
        except Exception:
            cause = None
        err = TaskError(
            message,
            cause=cause,
            cause_type_name=type_name,
            remote_traceback=tb,
            task_name=name,
            pid=os.getpid(),
            node_id=self.node_hex,
            worker_id=self.worker_id.hex(),
        )
        return err

    def _started(self, body: dict[str, Any]) -> None:
        """For the task log: a task that fails before ``_execute`` did start."""
        self.core.events.started(
            body["t"],
            body.get("at", 1),
            body.get("n", ""),
            self.core.job_id,
            self.actor_id,
            body.get("ts"),
            body.get("pt"),
        )

    def _error_reply(self, body: dict[str, Any], exc: BaseException, app_error: bool) -> Message:
        err = self._task_error(exc, body.get("n", "task"))
        self.core.events.ended(body["t"], FAILED, _error_fields(exc, err))
        msg = self._plain_error_reply(body, err)
        if app_error:
            msg.body["app_error"] = True
            msg.body["app_error_types"] = [
                f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__
            ]
        return msg

    def _plain_error_reply(self, body: dict[str, Any], err: BaseException) -> Message:
        sv = serialize_error(err)
        nr = body.get("nr", 1)
        if nr == STREAMING:
            return Message(
                M.TASK_DONE, {"t": body["t"], "r": [], "n": 1}, []
            )  # never reached in practice
        n = max(1, nr)
        descs = [[0, 1 + len(sv.buffers), sv.flags, []] for _ in range(n)]
        frames: list[Any] = []
        for _ in range(n):
            frames.append(sv.data)
            frames.extend(sv.buffers)
        return Message(M.TASK_DONE, {"t": body["t"], "r": descs}, frames)

    # -- actors ------------------------------------------------------------------------
    def _become_actor(self, body: dict[str, Any], frames: list[Any]) -> None:
        aid = body["aid"]
        ctx = _worker_context.current
        ctx.actor_id = self.actor_id = aid
        _worker_context.actor_restarts = int(body.get("restarts", 0))
        self.core.job_id = int(body.get("job", 0))
        meta = self.actor_meta = body["meta"]
        tag_token = _worker_context.output_tag.set(body.get("o"))
        try:
            cls = cloudpickle.loads(frames[0])
            args, kwargs = self._decode_args(body, frames, 1)
            ctx.task_name = f"{body['cls']}.__init__"
            self.actor = cls(*args, **kwargs)
        except BaseException as exc:
            err = serialize_error(self._task_error(exc, f"{body['cls']}.__init__"))
            self.core.send_head(Message(M.ACTOR_READY, {"aid": aid, "err": True}, err.frames()))
            return
        finally:
            ctx.task_name = ""
            self.output.flush()
            _worker_context.output_tag.reset(tag_token)
        concurrency = int(meta.get("mc") or 1)
        if meta.get("async"):
            import asyncio

            self.aloop = asyncio.new_event_loop()
            threading.Thread(target=self._run_aloop, name="shoal-actor-async", daemon=True).start()
        elif concurrency > 1:
            import concurrent.futures

            self.pool = concurrent.futures.ThreadPoolExecutor(
                concurrency, thread_name_prefix="shoal-actor"
            )
        self.core.send_head(Message(M.ACTOR_READY, {"aid": aid}))

    def _run_aloop(self) -> None:
        assert self.aloop is not None
        import asyncio

        asyncio.set_event_loop(self.aloop)
        self.asem = asyncio.Semaphore(int(self.actor_meta.get("mc") or 1000))
        self.aloop.run_forever()

    def _actor_call(self, peer: bytes, body: dict[str, Any], frames: Sequence[Any]) -> None:
        if self.actor is None:
            self._started(body)
            self._reply(
                peer,
                self._error_reply(
                    body, RuntimeError("this worker hosts no actor"), app_error=False
                ),
            )
            return
        name = body["n"]
        method = getattr(self.actor, body["m"], None)
        if method is None:
            self._started(body)
            self._reply(
                peer,
                self._error_reply(
                    body, AttributeError(f"the actor has no method {body['m']!r}"), False
                ),
            )
            return
        if self.aloop is not None:
            import asyncio

            asyncio.run_coroutine_threadsafe(
                self._async_call(peer, body, frames, method, name), self.aloop
            )
        elif self.pool is not None:
            self.pool.submit(self._threaded_call, peer, body, frames, method, name)
        else:
            self._reply(peer, self._execute(peer, body, frames, 0, method, body["t"], name, []))

    def _threaded_call(
        self, peer: bytes, body: dict[str, Any], frames: Sequence[Any], method: Any, name: str
    ) -> None:
        reply = self._execute(peer, body, frames, 0, method, body["t"], name, [])
        self.loop.call_soon_threadsafe(self._reply, peer, reply)

    async def _async_call(
        self, peer: bytes, body: dict[str, Any], frames: Sequence[Any], method: Any, name: str
    ) -> None:
        assert self.asem is not None
        async with self.asem:
            ctx = _worker_context.current
            ctx.actor_id = self.actor_id
            # This coroutine runs in a context of its own: the tag is this call's alone.
            _worker_context.output_tag.set(body.get("o"))
            self._started(body)
            try:
                import asyncio
                import inspect

                loop = asyncio.get_running_loop()
                # Arguments may need a blocking fetch from the store: off the event loop.
                args, kwargs = await loop.run_in_executor(None, self._decode_args, body, frames, 0)
                result = method(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
                reply = self._encode_returns(body["t"], name, body["nr"], result)
                self.core.events.ended(body["t"], FINISHED)
            except BaseException as exc:
                reply = self._error_reply(body, exc, app_error=True)
            self.output.flush()
        self.loop.call_soon_threadsafe(self._reply, peer, reply)


def _error_fields(exc: BaseException, error: TaskError) -> list[str]:
    """What the task log keeps of a failure: the class, the message, the traceback."""
    try:
        message = str(exc)
    except Exception:
        message = f"<{type(exc).__name__} whose str() failed>"
    return error_fields(error.cause_type_name, message, error.remote_traceback)


def _user_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` without Shoal's own frames.

    The first frame is always the worker's call into user code; later frames from the
    runtime's private modules (a failing ``get`` inside the task, say) are dropped too.
    """
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)[1:]
        if not (
            os.path.dirname(f.filename) == _RUNTIME_DIR
            and os.path.basename(f.filename).startswith("_")
            and os.path.basename(f.filename) != "_demo.py"
        )
    ]
    lines = ["Traceback (most recent call last):\n"] if frames else []
    lines += traceback.format_list(frames)
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def main() -> None:
    import logging

    # Log records go to the worker's log file (its original stderr), never to the driver.
    logging.basicConfig(
        stream=sys.__stderr__,
        level=os.environ.get("SHOAL_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    worker = WorkerProcess()
    worker.run()


if __name__ == "__main__":
    main()
