"""qvec.core.threads: independent torch jobs on worker threads, one intra-op thread each."""

import time

import pytest
import torch

from qvec.core.threads import map_threads, one_intraop_thread


def test_map_threads_keeps_order_and_restores_torch_threads():
    before = torch.get_num_threads()
    seen = []

    def job(i: int) -> int:
        seen.append(torch.get_num_threads())
        return int(torch.full((1000,), i).sum())

    assert map_threads(job, list(range(20)), workers=2) == [1000 * i for i in range(20)]
    assert set(seen) == {1}  # each job ran torch on its own thread only
    assert torch.get_num_threads() == before


def test_map_threads_raises_the_first_error_in_item_order():
    def job(i: int) -> int:
        if i in (3, 7):
            raise ValueError(f"bad {i}")
        return i

    with pytest.raises(ValueError, match="bad 3"):
        map_threads(job, list(range(10)), workers=2)


def test_one_intraop_thread_restores_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), one_intraop_thread():
        assert torch.get_num_threads() == 1
        raise RuntimeError("x")
    assert torch.get_num_threads() == before


def test_imap_threads_yields_in_order_and_drops_work_when_the_caller_stops():
    from qvec.core.threads import imap_threads

    before = torch.get_num_threads()
    done = []

    def job(i: int) -> int:
        time.sleep(0.005)
        done.append(i)
        return i * i

    results = imap_threads(job, list(range(200)), workers=2)
    assert [next(results) for _ in range(3)] == [0, 1, 4]
    results.close()  # the caller stops: work not started is cancelled, torch's threads come back
    assert len(done) < 200 and torch.get_num_threads() == before
