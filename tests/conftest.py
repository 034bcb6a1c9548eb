"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread and one numba thread for a module of tiny models: on a shared 2-core
    CPU, thread start-up and oversubscription cost more than the work (50 ms vs 50 us a matmul)."""
    import numba
    t, n = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(t)
    numba.set_num_threads(n)
