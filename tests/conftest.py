"""Test isolation: some tests and module fixtures (and the CLI commands they call in-process) switch autograd off for
the whole process, as a CLI may; restore it after each test and after each module (a module-scoped fixture runs
before any function-scoped one, so only a module-level restore undoes it), so a later test that trains
(tools/train_reference*, the caption encoder) sees the default."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _restore_grad_mode_per_module():
    mode = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(mode)


@pytest.fixture(autouse=True)
def _restore_grad_mode():
    mode = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(mode)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny tensors,
    thread start-up costs more than it saves (6x faster on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
