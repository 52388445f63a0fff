"""The node serves a Qwen2.5-VL preset over real DDS (tiny random weights, its own process):
a non-square image gets a refer result whose mask is in the image's pixels."""

import numpy as np
import pytest
from node_harness import NodeProcess, connect, is_rejection, rgb_image

pytestmark = [pytest.mark.timeout(120), pytest.mark.ros, pytest.mark.node]


def test_node_grounds_with_the_qwen_preset():
    node = NodeProcess({"model": "tiny-qwen2.5-vl-random", "query_mode": "refer"})
    try:
        client = connect(node)
        try:
            image = rgb_image(width=96, height=48, stamp_s=3.5, frame_id="cam_optical")
            client.publish_image(image)
            client.query("the cup")
            result = client.answer_to("the cup")
            assert result is not None and not is_rejection(result), getattr(
                result, "message", node.output()
            )
            assert result.model == "tiny-qwen2.5-vl-random" and result.answer == "the cup"
            assert len(result.phrases) == 1
            mask = result.phrases[0].mask
            assert (mask.height, mask.width) == (48, 96) and mask.header == image.header
            assert set(np.unique(np.frombuffer(mask.data, np.uint8))) <= {0, 255}
        finally:
            client.close()
    finally:
        node.close()
