"""The order the session runs its tests in.

Tests that use planned servers ("planned" tests, server_pool.py) run in the order of `grouped`, fixed after
collection: it is the order the pool starts and stops servers in. The other tests ("fillers") run whenever
the next planned test's servers are still starting (`interleaved`, decided one test ahead while the session
runs), so the tests' own work overlaps the server start-ups instead of waiting on them.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterator, Sequence, TypeVar

Item = TypeVar("Item")


def grouped(planned: Sequence[Item], servers_of: Callable[[Item], list[str]]) -> list[Item]:
    """`planned` reordered so that each server's uses come together and fewer servers are alive at once: after
    each test (taken in collection order), every later test is pulled forward whose servers are each alive
    already (named by a test that ran) or named by that test alone."""
    remaining, order = list(planned), []
    while remaining:
        order.append(remaining.pop(0))
        while pulled := next((test for test in remaining if _can_follow(test, order, remaining, servers_of)), None):
            remaining.remove(pulled)
            order.append(pulled)
    return order


def _can_follow(test, done: list, remaining: list, servers_of) -> bool:
    def alive(name):
        return any(name in servers_of(earlier) for earlier in done)

    def its_own(name):
        return not any(name in servers_of(other) for other in remaining if other is not test)

    return all(alive(name) or its_own(name) for name in servers_of(test))


def interleaved(items: Sequence[Item], servers_of: Callable[[Item], list[str]], module_of: Callable[[Item], object],
                ready: Callable[[list[str]], bool]) -> Iterator[tuple[Item, Item | None]]:
    """Yield (test, the test after it) until every test ran: pytest needs the next test before it runs one.
    `ready(names)` tells whether those servers serve now; so it is asked one test ahead. A test module goes on
    with its next test, of either kind, unless that one would wait for a server, so its fixtures are set up once
    where nothing is lost by it."""
    planned = deque(item for item in items if servers_of(item))
    fillers = deque(item for item in items if not servers_of(item))
    current = _pick(planned, fillers, None, servers_of, module_of, ready)
    while current is not None:
        following = _pick(planned, fillers, current, servers_of, module_of, ready)
        yield current, following
        current = following


def _pick(planned: deque, fillers: deque, last, servers_of, module_of, ready):
    for queue in (planned, fillers):  # the module that runs goes on, unless its next test would wait for a server
        if queue and last is not None and module_of(queue[0]) is module_of(last) and ready(servers_of(queue[0])):
            return queue.popleft()
    if planned and (not fillers or ready(servers_of(planned[0]))):
        return planned.popleft()
    return fillers.popleft() if fillers else None
