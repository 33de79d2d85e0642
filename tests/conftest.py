"""Test isolation: some tests (and the CLI commands they call in-process) switch autograd off for the whole
process, as a CLI may; restore it so a later test that trains (tools/train_reference*) sees the default."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_grad_mode():
    mode = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(mode)
