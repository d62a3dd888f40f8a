"""child.ChildRun: a generator function in a child process, streamed back; errors and crashes
come back as exceptions, a stop request ends it cleanly."""

from __future__ import annotations

import pytest

from napari_mevae.child import ChildCrashed, ChildRun, ChildService


def drain(run: ChildRun) -> tuple[list, object]:
    items = []
    gen = run.results()
    while True:
        try:
            items.append(next(gen))
        except StopIteration as stop:
            return items, stop.value


def test_yields_and_returns():
    items, value = drain(ChildRun("child_targets:count", 5))
    assert items == [0, 1, 2, 3, 4] and value == "counted 5"


def test_errors_come_back_with_their_type_and_message():
    run = ChildRun("child_targets:fail")
    gen = run.results()
    assert next(gen) == 1
    with pytest.raises(ValueError, match="bad cells: nothing to crop") as info:
        next(gen)
    assert "child_targets.py" in info.value.child_traceback


@pytest.mark.parametrize(("how", "words"), [("segfault", "SIGSEGV"), ("exit", "exit code 3")])
def test_a_crash_is_an_exception_not_a_hang(how, words):
    run = ChildRun("child_targets:crash", how)
    gen = run.results()
    assert next(gen) == 1  # and the print to stdout did not corrupt the stream
    with pytest.raises(ChildCrashed, match=words):
        next(gen)


def test_stop_ends_the_run_cleanly():
    run = ChildRun("child_targets:until_stopped")
    gen = run.results()
    assert next(gen) == 0
    run.stop()
    items = []
    with pytest.raises(StopIteration) as done:
        while True:
            items.append(next(gen))
    assert done.value.value == len(items) + 1  # it counted every item it yielded


def test_unknown_target_is_a_clear_error():
    with pytest.raises((ModuleNotFoundError, AttributeError)):
        drain(ChildRun("child_targets:no_such_function"))


def test_a_service_runs_jobs_one_after_the_other_in_one_process():
    service = ChildService()
    try:
        pid = service.pid
        items = list(service.submit("child_targets:count", 3))
        assert items == [0, 1, 2]
        gen = service.submit("child_targets:until_stopped")
        assert next(gen) == 0
        with pytest.raises(RuntimeError, match="busy"):
            service.submit("child_targets:count", 1)
        gen.close()  # left early: the job is stopped and its answer skipped
        _, value = drain_gen(service.submit("child_targets:count", 2))
        assert value == "counted 2" and service.pid == pid and service.alive
    finally:
        service.close()
    assert not service.alive


def drain_gen(gen) -> tuple[list, object]:
    items = []
    while True:
        try:
            items.append(next(gen))
        except StopIteration as stop:
            return items, stop.value


def test_a_waiting_submit_starts_when_the_job_before_has_ended():
    import threading

    service = ChildService()
    try:
        first = service.submit("child_targets:count", 3)
        got = {}

        def second():
            got["value"] = drain_gen(service.submit("child_targets:count", 2, wait=True))[1]

        t = threading.Thread(target=second)
        t.start()
        t.join(0.3)
        assert t.is_alive()  # waiting for the first job
        assert list(first) == [0, 1, 2]
        t.join(30)
        assert got["value"] == "counted 2"
    finally:
        service.close()
