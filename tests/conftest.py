"""Shared fixtures: tests run on CPU in float32 and leave the process as they found it."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_env_and_process_group():
    """Restore environment variables and tear down any process group a test created."""
    env_before = dict(os.environ)
    torch_threads = torch.get_num_threads()
    yield
    os.environ.clear()
    os.environ.update(env_before)
    torch.set_num_threads(torch_threads)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing may reach the Hugging Face hub (the env var for new readers, the constant for loaded ones)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
