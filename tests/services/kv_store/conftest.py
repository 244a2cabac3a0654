import pytest
from store_process import StoreProcess


@pytest.fixture
def start_store(tmp_path):
    """Starts a store of its own for tests that fill it, measure it or stop it."""
    started: list[StoreProcess] = []

    def start(*flags: str, **kwargs) -> StoreProcess:
        started.append(StoreProcess(tmp_path, *flags, **kwargs))
        return started[-1]

    try:
        yield start
    finally:
        for process in started:
            process.stop()
