"""Shared pytest set-up.

`make test` also runs the service and client tests (the Makefile's SERVE_TESTS) under each further
Python it finds (3.12, 3.13), in a venv holding only the serving set and the `test-serve` extra: no
torch, no dev tools. The few tests of those files that genuinely need one of them are listed here and
skipped where it is not installed. Everything else must pass there, so a service or client code path
that starts importing torch fails instead of being skipped.

`make test` runs the suite on two pytest-xdist workers, then the modules in SERIAL alone: they
time the service under load or against deadlines, and a neighbour exporting a model on the other
core would move what they measure.
"""

from __future__ import annotations

import importlib.util

import pytest

# module -> the tests (node ids) that need it
NEEDS = {
    "torch": {  # exporting a model, a PyTorch comparison, `musiq score` on a checkpoint
        "tests/test_rest.py::test_several_models_at_once_and_graceful_shutdown",
        "tests/test_rest.py::test_rest_equals_musiq_score_on_the_source_checkpoint",
        "tests/test_explain.py::test_embedded_rollout_graph_matches_the_checkpoint_in_pytorch",
    },
    "grpc_tools": {  # the dev extra's protoc (grpcio-tools): the check is the same on every Python
        "tests/test_grpc.py::test_generated_code_is_in_sync",
    },
}

# Tests whose assertions are about time under load (capacity, deadlines, queue order): marked
# `serial`, which `make test` runs after the parallel part, with the machine to themselves.
SERIAL = {
    "tests/test_batcher.py",
    "tests/test_deadlines.py",
    "tests/test_grpc_spread.py",
    "tests/test_prepare_pool.py",
    "tests/reliability/test_faults.py",
    "tests/reliability/test_overload.py",
}


def pytest_configure(config: pytest.Config) -> None:
    missing = sorted(f for f in SERIAL if not (config.rootpath / f).is_file())
    if missing:  # a renamed module would otherwise run beside the others, unnoticed
        raise pytest.UsageError(f"tests/conftest.py SERIAL names no such file: {missing}")
    config.addinivalue_line("markers", "needs(module): skipped where that module is not installed")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.split("::")[0] in SERIAL:
            item.add_marker(pytest.mark.serial)
    for module, node_ids in NEEDS.items():
        if importlib.util.find_spec(module) is not None:
            continue
        for item in items:
            if item.nodeid.split("[")[0] in node_ids:
                item.add_marker(pytest.mark.needs(module))
                item.add_marker(pytest.mark.skip(reason=f"needs {module} (not installed: the serving set)"))
