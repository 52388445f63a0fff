"""ROS-free attend-and-segment: recorder, phrases, heat maps, refiners and the Engine."""
