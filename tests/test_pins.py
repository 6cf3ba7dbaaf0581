"""The torch pin is written once, in pyproject.toml; the Makefile, the Dockerfiles and the worker setup.py read it."""
from __future__ import annotations

import re
import subprocess

from helpers import ROOT

READERS = ("Makefile", "deploy/dataflow/Dockerfile", "deploy/train/Dockerfile", "deploy/dataflow/setup.py",
           "deploy/dataflow/launch.sh")
# the one-liner those files use to read the pin
EXTRACT = r"""sed -n 's/^ *"\(torch==[^"]*\)",*$/\1/p' pyproject.toml"""


def test_pyproject_pins_torch_once_and_the_readers_one_liner_finds_it():
    pins = re.findall(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert len(pins) == 1
    out = subprocess.run(EXTRACT, shell=True, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"torch=={pins[0]}"


def test_no_other_build_file_writes_a_torch_version():
    for name in READERS:
        text = (ROOT / name).read_text()
        assert not re.search(r"torch==\d|pytorch/pytorch:\d", text), f"{name} writes a torch version itself"
