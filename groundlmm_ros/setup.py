from glob import glob

from setuptools import find_packages, setup

package_name = "groundlmm_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*")),
        ("share/" + package_name + "/config", glob("config/*")),
        ("share/" + package_name + "/model", glob("model/*")),
    ],
    package_data={package_name: ["model_files/*", "ros/*.xml"]},
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="groundlmm_ros developers",
    maintainer_email="groundlmm@example.org",
    description="Language-conditioned pixel grounding for ROS 2 (DiffLMM + attend-and-segment).",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "groundlmm_node = groundlmm_ros.ros.node:main",
            "groundlmm = groundlmm_ros.cli:main",
        ],
    },
)
