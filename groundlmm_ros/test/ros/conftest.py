"""The ros layer's tests: a module's `node` fixture (a node_harness.NodeProcess) and its client.
The run-wide settings (offline hub, the run's ROS domain, the watchdog) are in ../conftest.py."""

import pytest


@pytest.fixture(scope="module")
def client(node):
    """A client of the module's `node` fixture (a NodeProcess), seeing it active."""
    from node_harness import connect

    client = connect(node)
    yield client
    client.close()
