"""The online decoding engine: requests submitted one at a time (from any thread), each answered by its
own future as soon as its beams finish, while the batch keeps running for the others.

`DecodingEngine` owns the queue, the admission policy, deadlines and cancellation; the decoding itself
is a *batch* object (`beam_search.BeamBatch`: the catalogue-constrained beam search) with

    batch.admit(requests)       prefill the requests and add them to the running batch
    batch.step() -> finished    one beam step for every active user; [(request, DecodeResult)] that ended
    batch.retire(predicate)     drop the active users whose request satisfies predicate (cancelled, late)
    batch.reset()               drop everything (after an error)
    len(batch)                  active users

Offline evaluation (`beam_search_prompts`: submit every prompt, `run_until_idle()` in the calling
thread), `Recommender.recommend` and the HTTP server (`serving`: `start()` runs the loop in one engine
thread that owns the model) all decode through this one class, so a user's list cannot depend on
which of the three asked for it, nor on what else is in the batch.

Written by hand because the continuous batching is inside our own beam search (no serving framework
knows a trie-constrained beam search over a latent-thought model); the threading is the standard
library's (`concurrent.futures.Future`, `threading.Condition`).
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field


class QueueFull(RuntimeError):
    """More requests are waiting for admission than the engine's max_queue."""


class EngineClosed(RuntimeError):
    """The engine no longer accepts requests (it is draining or stopped)."""


class DeadlineExceeded(TimeoutError):
    """A request was still waiting or decoding at its deadline; its decoding was abandoned."""


@dataclass
class DecodeResult:
    titles: list[str]          # best first, distinct catalogue titles, at most top_k
    scores: list[float]        # matching normalised scores
    title_index: list[int]     # index of each title in trie.titles_unique


_uids = itertools.count()


@dataclass(eq=False)
class DecodeRequest:
    prompt: list[int]                      # token ids of the full prompt
    top_k: int                             # titles wanted
    exclude: tuple[int, ...] = ()          # trie.titles_unique indices never returned (their leaves masked)
    key: object = None                     # the caller's name for it (beam_search_prompts: prompt index)
    deadline: float | None = None          # time.monotonic() after which it is abandoned
    future: Future = field(default_factory=Future)
    uid: int = field(default_factory=lambda: next(_uids))
    submitted: float = field(default_factory=time.monotonic)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


def _resolve(fut: Future, result=None, error: BaseException | None = None) -> None:
    """Sets a future unless its caller already cancelled it (a client that went away)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


class DecodingEngine:
    """Continuous batching over a `batch` (see the module docstring).

    max_users: users decoded at once (bounds memory).  admit_at: free places that trigger an admission
    (one prefill of up to that many waiting users; 1 = admit as soon as a place is free, the server's
    setting; max_users = static batches).  max_queue: requests waiting for admission before `submit`
    raises QueueFull (None = unbounded).  on_step(batch_size) is called after every beam step.
    """

    def __init__(self, batch, max_users: int = 16, admit_at: int = 1, max_queue: int | None = None,
                 on_step=None):
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users}")
        if not 1 <= admit_at <= max_users:
            raise ValueError(f"admit_at must be in [1, max_users={max_users}], got {admit_at}")
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.batch, self.max_users, self.admit_at, self.max_queue = batch, max_users, admit_at, max_queue
        self.on_step = on_step
        self._waiting: deque[DecodeRequest] = deque()
        self._active: dict[int, DecodeRequest] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._calls: deque[tuple[object, Future]] = deque()   # work for the model's thread (call())
        self._stopped = False   # the thread has left its loop: nothing will run calls any more
        self.steps = 0
        self.abandoned = 0      # requests dropped unanswered: cancelled by their caller or past their deadline

    # ------------------------------------------------------------------ submitting (any thread)
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, prompt: list[int], top_k: int, exclude=(), key=None, deadline: float | None = None) -> Future:
        """Queues one prompt; the future's result is a DecodeResult (or DeadlineExceeded / the step's error)."""
        (fut,) = self.submit_many([DecodeRequest(list(prompt), int(top_k), tuple(exclude), key, deadline)])
        return fut

    def submit_many(self, requests: list[DecodeRequest]) -> list[Future]:
        """Queues all of `requests` or none (QueueFull / EngineClosed, or the batch's ValueError for a
        request it cannot decode): a batch request is one unit."""
        check = getattr(self.batch, "check", None)
        if check is not None:
            for r in requests:
                check(r)
        with self._cond:
            if self._closed:
                raise EngineClosed("the decoding engine is not accepting requests (shutting down)")
            if self.max_queue is not None and len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests already wait for admission "
                                f"(max_queue {self.max_queue})")
            self._waiting.extend(requests)
            self._cond.notify_all()
        return [r.future for r in requests]

    def call(self, fn) -> Future:
        """Runs fn() in the thread that owns the model, between two beam steps; its future gets the result."""
        fut: Future = Future()
        with self._cond:
            if self._stopped:
                raise EngineClosed("the decoding engine has stopped (the caller may now use the model itself)")
            self._calls.append((fn, fut))
            self._cond.notify_all()
        if self._thread is None:
            self._run_calls()
        return fut

    def _run_calls(self) -> None:
        while self._calls:
            fn, fut = self._calls.popleft()
            if fut.cancelled():
                continue
            try:
                _resolve(fut, fn())
            except Exception as e:  # noqa: BLE001 - the caller gets it
                _resolve(fut, error=e)

    # ------------------------------------------------------------------ decoding (one thread)
    def _take_waiting(self, n: int, now: float) -> list[DecodeRequest]:
        out = []
        with self._cond:
            while self._waiting and len(out) < n:
                req = self._waiting.popleft()
                if req.future.cancelled():
                    self.abandoned += 1
                    continue
                if req.expired(now):
                    _resolve(req.future, error=DeadlineExceeded("deadline passed while queued"))
                    self.abandoned += 1
                    continue
                out.append(req)
        return out

    def pending(self) -> bool:
        return bool(self._waiting) or bool(self._active)

    def step(self) -> list[DecodeRequest]:
        """Admits waiting users when due, runs one beam step; returns the requests it answered."""
        if self._calls:
            self._run_calls()
        now = time.monotonic()
        done: list[DecodeRequest] = []
        try:
            if self._active:
                gone = [r for r in self._active.values() if r.future.cancelled() or r.expired(now)]
                if gone:
                    uids = {r.uid for r in gone}
                    self.batch.retire(lambda r: r.uid in uids)
                    self.abandoned += len(gone)
                    for r in gone:
                        del self._active[r.uid]
                        _resolve(r.future, error=DeadlineExceeded("deadline passed while decoding"))
            free = self.max_users - len(self._active)
            if self._waiting and (free >= self.admit_at or not self._active):
                new = self._take_waiting(free, now)
                if new:
                    self.batch.admit(new)
                    self._active.update((r.uid, r) for r in new)
            if not self._active:
                return done
            size = len(self._active)
            for req, result in self.batch.step():
                del self._active[req.uid]
                _resolve(req.future, result)
                done.append(req)
            self.steps += 1
            if self.on_step is not None:
                self.on_step(size)
        except Exception as e:  # noqa: BLE001 - every caller waiting on this batch gets the error
            for r in self._active.values():
                _resolve(r.future, error=e)
                done.append(r)
            self._active.clear()
            self.batch.reset()
            if self._thread is None:     # synchronous use: the caller sees the error
                raise
        return done

    def run_until_idle(self, progress=None) -> None:
        """Decodes in the calling thread until nothing waits or runs; progress.update(n) as users finish."""
        while self.pending():
            done = self.step()
            if progress is not None and done:
                progress.update(len(done))

    # ------------------------------------------------------------------ background thread
    def start(self) -> "DecodingEngine":
        """Runs the decoding loop in a daemon thread (which from then on owns the model)."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._loop, name="latentr3-decoding", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._active and not self._calls and not self._closed:
                    self._cond.wait()
                if self._closed and not self._waiting and not self._active and not self._calls:
                    self._stopped = True
                    return
            self.step()

    def close(self, timeout: float | None = None) -> bool:
        """Stops accepting requests, answers every accepted one, stops the thread; True if it finished."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is None:
            self.run_until_idle()
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()
