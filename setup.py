"""Build script. The package is pure Python today; the optional C++/CUDA extension (csrc/) will be
built here, skippable with an environment switch, and loaded lazily so that import never breaks."""
from setuptools import setup

setup()
