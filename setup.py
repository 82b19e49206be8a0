"""Packaging for the single module threadward.py (and its templates/)."""

import re

from setuptools import setup

with open("threadward.py") as stream:   # read, not import: psutil may not be installed yet
    VERSION = re.search(r'^__version__ = "([^"]+)"', stream.read(), re.M).group(1)

with open("README.md") as stream:
    LONG_DESCRIPTION = stream.read()

setup(
    name="threadward",
    version=VERSION,
    description="Run a Python task over every combination of variables on persistent "
                "subprocess workers pinned to GPUs",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    license="MIT",
    py_modules=["threadward"],
    data_files=[("share/threadward/templates", [
        "templates/task_specification.py",
        "templates/resource_constraints.py",
        "templates/variable_iteration.py"])],
    entry_points={"console_scripts": ["threadward = threadward:main"]},
    python_requires=">=3.9",
    install_requires=[
        "psutil",
        "GPUtil",
        # GPUtil imports distutils, which Python 3.12 removed; setuptools provides it.
        "setuptools; python_version >= '3.12'",
    ],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Environment :: GPU :: NVIDIA CUDA",
    ],
)
