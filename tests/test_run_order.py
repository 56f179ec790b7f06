"""The session's run order (run_order.py): tests that use no planned server fill the time servers take to start."""

from run_order import grouped, interleaved

# test -> the servers it names; a test's module is the letter before its dot
SERVERS = {"a.1": [], "a.2": [], "b.1": ["s1"], "b.2": ["s2"], "c.1": [], "c.2": [], "d.1": ["s1"], "e.1": []}


def run(ready_after: dict[str, int]) -> list[str]:
    """The order, with server s serving once ready_after[s] tests have finished."""
    done: list[str] = []

    def ready(names):
        return all(len(done) >= ready_after[name] for name in names)

    for item, following in interleaved(list(SERVERS), SERVERS.get, lambda item: item.split(".")[0], ready):
        done.append(item)
        assert following is None or following not in done
    return done


def test_planned_tests_run_as_soon_as_their_servers_serve():
    assert run({"s1": 0, "s2": 0}) == ["b.1", "b.2", "d.1", "a.1", "a.2", "c.1", "c.2", "e.1"]


def test_other_tests_fill_the_wait_a_module_at_a_time():
    # s1 serves after one test, but module a is not left half-way for it
    assert run({"s1": 1, "s2": 1}) == ["a.1", "a.2", "b.1", "b.2", "d.1", "c.1", "c.2", "e.1"]
    # s2 is late: module b does not go on with b.2, which would wait; e.1 runs first, then b.2 waits for s2
    assert run({"s1": 3, "s2": 99}) == ["a.1", "a.2", "c.1", "c.2", "b.1", "e.1", "b.2", "d.1"]


def test_planned_tests_wait_once_nothing_else_is_left():
    assert run({"s1": 99, "s2": 99}) == ["a.1", "a.2", "c.1", "c.2", "e.1", "b.1", "b.2", "d.1"]


def test_each_servers_uses_come_together():
    uses = {"t1": ["plain"], "t2": ["tp2"], "t3": ["mask"], "t4": ["tp2"], "t5": ["plain", "mask"], "t6": ["tp2", "fused"]}
    # after t2 starts tp2, its other uses follow, t6 with the server it alone names; t5 once both of its are alive
    assert grouped(list(uses), uses.get) == ["t1", "t2", "t4", "t6", "t3", "t5"]
