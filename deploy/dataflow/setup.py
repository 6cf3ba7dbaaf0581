"""The Dataflow worker package: `maskstream.pipeline` and `maskstream.loader`, with only what the Beam job needs
on a worker.

launch.sh copies this file beside the two packages into a staging folder and passes it as --setup_file, so
workers install tokenizers and numpy but not the trainer's dependencies. torch is needed on workers only for
`--masking static`: use the container image (Dockerfile) for that, or pass MASKSTREAM_WORKER_TORCH=1.
The torch pin is pyproject.toml's: launch.sh writes it beside this file as torch-requirement.txt.
"""
import os
from pathlib import Path

import setuptools

requires = ["tokenizers>=0.19,<0.24", "numpy>=1.26", "pyarrow>=14"]
if os.environ.get("MASKSTREAM_WORKER_TORCH") == "1":
    requires.append((Path(__file__).resolve().parent / "torch-requirement.txt").read_text().strip())

setuptools.setup(
    name="maskstream-dataflow-worker",
    version="0.1.0",
    packages=["maskstream", "maskstream.pipeline", "maskstream.loader"],
    package_dir={"maskstream": "maskstream", "maskstream.pipeline": "pipeline", "maskstream.loader": "loader"},
    install_requires=requires,
)
