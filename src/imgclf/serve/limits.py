"""What bounds the server's memory, whatever arrives.

Three budgets, each a hard ceiling rather than a guess:

- :class:`DecodeBudget`: bytes that image decoding may use at once, across the
  decode threads. Each decode reserves its estimated peak (from the header,
  before any pixel is decoded) and waits while the others would pass the
  budget; an image that could never fit is refused with 413.
- :class:`BodyBudget`: bytes of request bodies held at once. A body holds only
  the bytes that have arrived, growing its share as chunks come, so connections that
  trickle a body in (one byte a second under a large Content-Length) hold almost
  nothing, and a normal upload beside them is not held up. A body that cannot grow
  for :data:`BODY_WAIT` seconds (the server is full of bodies) is answered 503 and
  lets go, so bodies never wait on each other for ever.
- the pending-image semaphore in the app (images decoded but not yet scored).

Waiting instead of failing keeps bursts working; the budgets only change how
many large things happen at the same time.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

from imgclf import options
from imgclf.errors import ImageTooLargeError

if TYPE_CHECKING:
    import asyncio

MB = options.MB

# The limits a user can set are declared with ``imgclf serve``'s options (imgclf.options):
#: Largest image the server decodes, by default (a 48 MP phone photo fits).
SERVE_MAX_PIXELS = options.SERVE_MAX_PIXELS
#: Bytes that concurrent decodes may use together, by default.
DECODE_MEMORY_BYTES = options.DECODE_MEMORY_MB * MB
#: Largest request body, by default.
MAX_REQUEST_BYTES = int(options.SERVE_MAX_REQUEST_MB * MB)
#: Files one multipart request may carry.
MAX_FILES = options.MAX_FILES
#: Seconds to wait for the next piece of a request body before answering 408.
READ_TIMEOUT = options.READ_TIMEOUT
#: Request bodies held at once, in multiples of the request size limit.
BODIES_IN_FLIGHT = 4
#: Images decoded and waiting for the network, across all requests.
PENDING_IMAGES = 128
#: Once a body has been arriving for READ_TIMEOUT seconds it must average at least this
#: many bytes a second, or it is answered 408: a trickle cannot hold a connection for ever.
MIN_BODY_RATE = 16 * 1024
#: Seconds a body waits for room in the body budget before it is answered 503.
BODY_WAIT = 10.0


class DecodeBudget:
    """At most ``capacity`` bytes of image decoding at once (thread-safe).

    Pass :meth:`reserve` to :func:`imgclf.data.imaging.load_array`, which enters
    it with the decode's estimated peak memory.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        if nbytes > self.capacity:
            raise ImageTooLargeError(
                f"decoding it needs about {nbytes / MB:,.0f} MB, more than the server's "
                f"{self.capacity / MB:,.0f} MB decode budget; send a smaller image"
            )
        with self._changed:
            self._changed.wait_for(lambda: self.in_use + nbytes <= self.capacity)
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= nbytes
                self._changed.notify_all()


class BudgetFull(Exception):
    """No room in the body budget within the wait: the server answers 503."""


class BodyBudget:
    """At most ``capacity`` bytes of request bodies held at once (one event loop)."""

    def __init__(self, capacity: int, wait: float = BODY_WAIT):
        self.capacity = capacity
        self.wait = wait
        self.in_use = 0
        self.peak = 0
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            import asyncio  # here, not at the top: the CLI reads this module's limits for --help

            self._changed = asyncio.Condition()
        return self._changed

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[BodyShare]:
        """A body's share of the budget, empty at first; released when the request is done."""
        share = BodyShare(self)
        try:
            yield share
        finally:
            if share.held:
                async with self._condition():
                    self.in_use -= share.held
                    self._condition().notify_all()


class BodyShare:
    """The bytes one body holds in a :class:`BodyBudget`."""

    def __init__(self, budget: BodyBudget):
        self.budget = budget
        self.held = 0

    async def grow(self, nbytes: int) -> None:
        """Hold ``nbytes`` more, waiting for room; raises :class:`BudgetFull` after the budget's wait."""
        import asyncio

        budget, changed = self.budget, self.budget._condition()
        nbytes = min(nbytes, budget.capacity)
        async with changed:
            try:
                await asyncio.wait_for(changed.wait_for(lambda: budget.in_use + nbytes <= budget.capacity),
                                       budget.wait)  # fmt: skip
            except (asyncio.TimeoutError, TimeoutError):
                raise BudgetFull from None
            budget.in_use += nbytes
            budget.peak = max(budget.peak, budget.in_use)
        self.held += nbytes


def tune_malloc(arenas: int = 2, mmap_threshold: int = 1 * MB) -> None:
    """Make freed memory go back to the system. Decode threads otherwise each keep
    their own heap (``M_ARENA_MAX``), and glibc raises its mmap threshold after the
    first large free, so later image buffers come from heaps that are never given
    back: RSS stays at its peak after one large image. A fixed ``M_MMAP_THRESHOLD``
    keeps every buffer of ``mmap_threshold`` or more in its own mapping, returned
    when freed. No-op where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
