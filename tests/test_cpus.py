"""One training job per CPU: the claiming of CPUs by lock files."""

import threading
import time

from actgrad.training.cpus import ENV_SWITCH, cpu_slot


def test_a_second_job_waits_until_the_cpu_is_free(tmp_path):
    events = []
    first_holds = threading.Event()

    def first():
        with cpu_slot(1, cpus=[0], lock_dir=tmp_path, log=lambda m: None) as held:
            events.append(("first got", held))
            first_holds.set()
            time.sleep(0.5)
            events.append(("first done", None))

    t = threading.Thread(target=first)
    t.start()
    first_holds.wait(5)
    messages = []
    with cpu_slot(1, cpus=[0], lock_dir=tmp_path, log=messages.append, poll_seconds=0.05) as held:
        events.append(("second got", held))
    t.join()
    assert [e[0] for e in events] == ["first got", "first done", "second got"]
    assert events[2][1] == [0]
    assert messages[0].startswith("waiting for a free CPU")


def test_jobs_on_different_cpus_do_not_wait(tmp_path):
    with cpu_slot(1, cpus=[0, 1], lock_dir=tmp_path) as a:
        with cpu_slot(1, cpus=[0, 1], lock_dir=tmp_path, poll_seconds=10) as b:
            assert sorted(a + b) == [0, 1]


def test_a_job_claims_as_many_cpus_as_threads_and_at_most_all(tmp_path):
    with cpu_slot(2, cpus=[3, 5, 7], lock_dir=tmp_path) as held:
        assert held == [3, 5]
    with cpu_slot(8, cpus=[3, 5], lock_dir=tmp_path) as held:
        assert held == [3, 5]


def test_the_cpus_are_released_on_an_error(tmp_path):
    try:
        with cpu_slot(1, cpus=[0], lock_dir=tmp_path):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with cpu_slot(1, cpus=[0], lock_dir=tmp_path, poll_seconds=10) as held:
        assert held == [0]


def test_the_switch_turns_claiming_off(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "off")
    with cpu_slot(1, cpus=[0], lock_dir=tmp_path) as a:
        with cpu_slot(1, cpus=[0], lock_dir=tmp_path, poll_seconds=10) as b:
            assert a == b == []
