import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Tests use tiny models, for which one thread is fastest; it also keeps the subprocesses that
# several tests start from fighting over the cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
