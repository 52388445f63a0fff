"""ROS-free, model-free attend-and-segment: phrases, heat maps, refiners and the Engine."""
