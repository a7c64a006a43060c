"""The tests' own harness: how they launch scripts."""

import time

import pytest

from conftest import assert_process_ended, run_script

# Starts a worker in a session of its own, as torchrun starts its workers, prints its pid and waits.
SCRIPT_WITH_A_WORKER = ("import subprocess, sys, time; "
                        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
                        "start_new_session=True); print(worker.pid, flush=True); time.sleep(120)")


def test_a_script_past_its_timeout_is_ended_with_the_processes_it_started():
    """``run_script``, which launches the tests' training runs: a run that hangs fails its test at the
    timeout, and the processes it started, which hold its output, end with it rather than hold the
    test or slow the tests after it."""
    started = time.time()
    with pytest.raises(pytest.fail.Exception, match="still running after 3 s") as failure:
        run_script("-c", SCRIPT_WITH_A_WORKER, timeout=3)
    assert time.time() - started < 60
    assert_process_ended(int(str(failure.value).splitlines()[1]))
