"""Test-run wide settings: never touch a model hub, and give this run its own
ROS domain so parallel runs on one machine do not cross-talk."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Domains 1..200 keep clear of the default 0 (and of the port range limit near 232).
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 200))
