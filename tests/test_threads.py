"""qvec.core.threads: independent torch jobs on worker threads, one intra-op thread each."""

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
