"""Subscriptions and publishers that say why they get nothing: when the other side's QoS is
incompatible, rclpy matches silently nothing; these log which policy and what to change."""

from __future__ import annotations

from rclpy.qos import QoSProfile, qos_policy_name_from_kind
from std_msgs.msg import String

try:  # Iron and newer
    from rclpy.event_handler import PublisherEventCallbacks, SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import PublisherEventCallbacks, SubscriptionEventCallbacks


def subscription(node, msg_type, topic: str, callback, qos: QoSProfile, callback_group):
    """node.create_subscription, warning about incompatible publishers."""

    def incompatible(event) -> None:
        policy = qos_policy_name_from_kind(event.last_policy_kind)
        hint = {
            "RELIABILITY": "set the parameter image_qos_reliability:=best_effort "
            "(or publish reliably)"
            if msg_type is not String
            else "publish queries with RELIABLE reliability",
            "DURABILITY": "publish with VOLATILE or TRANSIENT_LOCAL durability",
        }.get(policy, "make the publisher's QoS match")
        node.get_logger().warning(
            f"a publisher on {node.resolve_topic_name(topic)} offers QoS incompatible with "
            "this subscription "
            f"(policy {policy}; this node asks "
            f"reliability={qos.reliability.name.lower()}): nothing is "
            f"received from it; {hint}"
        )

    return node.create_subscription(
        msg_type,
        topic,
        callback,
        qos,
        callback_group=callback_group,
        event_callbacks=SubscriptionEventCallbacks(incompatible_qos=incompatible),
    )


def publisher(node, msg_type, topic: str, qos: QoSProfile, lifecycle: bool = False):
    """node.create_publisher (create_lifecycle_publisher when `lifecycle`: it publishes only
    while the node is active), warning about incompatible subscribers."""

    def incompatible(event) -> None:
        node.get_logger().warning(
            f"a subscriber of {node.resolve_topic_name(topic)} asks for QoS "
            "this node does not offer "
            f"(policy {qos_policy_name_from_kind(event.last_policy_kind)}): "
            "it receives nothing; "
            "subscribe with reliability best_effort or reliable and durability volatile"
        )

    create = node.create_lifecycle_publisher if lifecycle else node.create_publisher
    return create(
        msg_type,
        topic,
        qos,
        event_callbacks=PublisherEventCallbacks(incompatible_qos=incompatible),
    )
