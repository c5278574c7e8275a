"""Shared pytest setup for the whole suite.

Every test starts and ends with a fresh Dynamo: compiled code, guards and counters of one test
never leak into the next (``torch._dynamo.reset()`` before and after each test). A reset that
separates two compilations *inside* one test stays in that test.

Markers (registered in pyproject.toml, ``--strict-markers``): ``slow`` (more than ~10 s on a
2-core CPU machine; zoo and distributed tests are slow too), ``distributed`` (spawns gloo
process groups), ``zoo`` (the tiny diffusers transformers of ``tests/zoo``). The quick loop is
``python -m pytest -q -m "not slow"``.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
