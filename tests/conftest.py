"""Shared fixtures. Model-backed fixtures load SmolLM2-135M-Instruct once per test session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default model, fp32 on the CPU."""
    from tiercache.models import load_default_model

    torch.manual_seed(0)
    return load_default_model()
