"""Lifecycle in process: cleanup lets the model go (no reference left to keep its memory), configure
fails cleanly on a bad model. (test_node_basic.py drives the transitions over DDS.)"""

import gc
import weakref

import pytest
import rclpy
from rclpy.parameter import Parameter

from groundlmm_ros.models.presets import build_engine
from groundlmm_ros.ros.node import GroundingNode

pytestmark = pytest.mark.ros


class Built:
    """An engine factory that keeps a weak reference to each engine it builds."""

    def __init__(self):
        self.engines: list[weakref.ref] = []

    def __call__(self, model, **options):
        engine = build_engine(model, **options)
        self.engines.append(weakref.ref(engine))
        return engine


@pytest.fixture
def built():
    return Built()


@pytest.fixture
def node(built):
    context = rclpy.Context()
    rclpy.init(context=context)
    node = GroundingNode(
        built, context=context, parameter_overrides=[Parameter("autostart", value=False)]
    )
    yield node
    node.shut_down()
    node.destroy_node()
    rclpy.shutdown(context=context)


def test_cleanup_releases_the_model(node, built):
    assert node.trigger_configure().name == "SUCCESS"
    assert node.trigger_activate().name == "SUCCESS" and node.state == "active"
    (engine,) = built.engines
    assert node.trigger_deactivate().name == "SUCCESS" and node.state == "inactive"
    assert node.trigger_cleanup().name == "SUCCESS" and node.state == "unconfigured"
    gc.collect()
    assert engine() is None, gc.get_referrers(engine())
    # and it comes back
    assert node.trigger_configure().name == "SUCCESS" and len(built.engines) == 2


def test_configure_with_a_bad_model_fails_and_the_node_stays_unconfigured(node):
    node.set_parameters([Parameter("model", value="/no/such/model")])
    assert node.trigger_configure().name == "FAILURE" and node.state == "unconfigured"
    refused = node.set_parameters([Parameter("query_queue_size", value=0)])[0]
    assert not refused.successful and "query_queue_size=0: must be > 0" in refused.reason
    node.set_parameters([Parameter("model", value="tiny-random")])
    assert node.trigger_configure().name == "SUCCESS"
