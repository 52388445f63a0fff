"""Depth to 3D, in process: units, deprojection, the robust centroid, stamp matching, PointCloud2.

(test_node_inputs.py checks the same path end to end through the node over DDS.)
"""

import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo
from std_msgs.msg import Header

from groundlmm_ros.ros import depth
from groundlmm_ros.ros.conversion import numpy_to_image

K = np.array([[100.0, 0.0, 40.0], [0.0, 120.0, 30.0], [0.0, 0.0, 1.0]])


def stamped(seconds: float) -> Header:
    header = Header(frame_id="cam")
    header.stamp.sec, header.stamp.nanosec = int(seconds), int(round((seconds % 1) * 1e9))
    return header


def test_depth_units_and_invalid_pixels():
    millimetres = np.array([[1500, 0], [65535, 250]], np.uint16)
    metres = depth.depth_metres(numpy_to_image(millimetres, "16UC1"), unit_divisor=1000.0)
    assert np.allclose(metres, [[1.5, np.nan], [65.535, 0.25]], equal_nan=True)
    floats = np.array([[0.8, np.nan], [np.inf, -1.0]], np.float32)
    metres = depth.depth_metres(
        numpy_to_image(floats, "32FC1"), unit_divisor=1000.0
    )  # divisor ignored: metres
    assert np.allclose(metres, [[0.8, np.nan], [np.nan, np.nan]], equal_nan=True)
    with pytest.raises(depth.DepthError, match="'8UC1' is not supported"):
        depth.depth_metres(numpy_to_image(np.zeros((2, 2), np.uint8), "8UC1"), 1000.0)


def test_a_pixel_deprojects_with_k():
    depth_m = np.full((60, 80), np.nan, np.float32)
    depth_m[20, 60] = 2.0
    mask = np.zeros((60, 80), bool)
    mask[20, 60] = mask[0, 0] = True  # (0, 0) has no depth and is skipped
    points = depth.mask_points(depth_m, mask, K)
    assert np.allclose(points, [[(60 - 40) * 2.0 / 100, (20 - 30) * 2.0 / 120, 2.0]])


def test_centroid_is_robust_to_background_pixels_and_nan_without_depth():
    depth_m = np.full((60, 80), 1.0, np.float32)
    mask = np.zeros((60, 80), bool)
    mask[20:40, 30:50] = True
    depth_m[20:40, 30:36] = 6.0  # 30% of the mask bleeds onto a wall behind the object
    z = depth.centroid(depth.mask_points(depth_m, mask, K))[2]
    assert z == pytest.approx(1.0)
    assert np.isnan(depth.centroid(np.zeros((0, 3), np.float32))).all()


def test_masks_points_check_sizes_and_calibration():
    info = CameraInfo(width=80, height=60, k=K.ravel().tolist())
    mask = np.ones((60, 80), bool)
    small = numpy_to_image(np.ones((30, 40), np.float32), "32FC1")
    with pytest.raises(
        depth.DepthError, match="depth image is 40x30 but the colour image is 80x60"
    ):
        depth.masks_points([mask], small, info, 1000.0)
    plane = numpy_to_image(np.ones((60, 80), np.float32), "32FC1")
    with pytest.raises(depth.DepthError, match="not calibrated"):
        depth.masks_points([mask], plane, CameraInfo(width=80, height=60), 1000.0)
    with pytest.raises(depth.DepthError, match="camera_info is for 40x30"):
        depth.masks_points(
            [mask], plane, CameraInfo(width=40, height=30, k=K.ravel().tolist()), 1000.0
        )
    assert len(depth.masks_points([mask], plane, info, 1000.0)[0]) == 80 * 60


def test_buffer_matches_the_nearest_stamp_within_tolerance():
    buffer = depth.DepthBuffer()
    with pytest.raises(depth.DepthError, match="no camera_info"):
        buffer.match(stamped(1.0), 0.05)
    buffer.set_info(CameraInfo())
    for seconds in (1.0, 1.04, 1.2):
        buffer.add_depth(numpy_to_image(np.ones((2, 2), np.float32), "32FC1", stamped(seconds)))
    frame, _ = buffer.match(stamped(1.03), 0.05)
    assert frame.header.stamp.nanosec == 40_000_000
    with pytest.raises(depth.DepthError, match="nearest is 0.080 s away"):
        buffer.match(stamped(1.12), 0.05)


def test_pointcloud_layout_reads_back():
    points = [np.array([[1, 2, 3]], np.float32), np.array([[4, 5, 6], [7, 8, 9]], np.float32)]
    cloud = depth.pointcloud(points, stamped(2.0))
    layout = np.dtype(
        {
            "names": [f.name for f in cloud.fields],
            "offsets": [f.offset for f in cloud.fields],
            "formats": ["<f4", "<f4", "<f4", "<u4"],
            "itemsize": cloud.point_step,
        }
    )
    read = np.frombuffer(bytes(cloud.data), layout)
    assert cloud.width == 3 and list(read["phrase"]) == [0, 1, 1]
    assert np.allclose(np.stack([read["x"], read["y"], read["z"]], 1), np.concatenate(points))
