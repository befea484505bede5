import os

import pytest
import torch

# Two cores are shared by everything in CI; one intra-op thread keeps tests predictable.
torch.set_num_threads(1)
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture
def digits_results(tmp_path):
    """A results root with the prepared digits data set."""
    from rcm.data import prepare

    prepare("digits", tmp_path)
    return tmp_path


# The files that hold the longest runs (a whole tiny DAG each) start first: under `pytest -n 2 --dist
# loadfile` (make test) a worker takes a file at a time in collection order, and a long file taken
# last would leave the other worker idle at the end.
FIRST = ("test_workflow.py", "test_slurm.py", "test_workflow_import.py", "test_distributed.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: the rest keep their order
