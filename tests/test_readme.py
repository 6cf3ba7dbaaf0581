"""The README's examples run as written: every ```bash block of "The commands", in order, then the loader snippet.

They run in a fresh folder holding only a link to the repository's data/ (the examples' paths are relative to
the repository root), with the venv's console scripts first on PATH. The README is parsed when the test runs,
so it covers whatever examples the README holds.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def section(text: str, title: str) -> str:
    """The body of the `## title` section."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.S | re.M)


def test_the_readme_lists_examples_to_run():
    readme = (ROOT / "README.md").read_text()
    commands = blocks(section(readme, "The commands"), "bash")
    assert len(commands) >= 6 and all(block.strip() for block in commands)
    python = blocks(section(readme, "The loader in your own training loop"), "python")
    assert len(python) >= 2 and any("mask_batch(" in block for block in python)


@pytest.mark.slow
@pytest.mark.timeout(1200)   # ~250 s of CPU in a dozen processes: past the default limit on a busy shared machine
def test_every_command_example_and_the_loader_snippet_run_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    (tmp_path / "data").symlink_to(ROOT / "data")
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop("MASKSTREAM_DEBUG", None)
    # NOTE: one torch thread per process, as torchrun sets: with several processes on 2 shared cores, spinning
    # intra-op threads multiplied the examples' CPU time; the commands and their outputs are the same
    env.setdefault("OMP_NUM_THREADS", "1")
    for block in blocks(section(readme, "The commands"), "bash"):
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"README example failed:\n{block}\n--- stderr ---\n{done.stderr[-3000:]}"
    assert (tmp_path / "runs" / "tiny" / "loss.png").is_file()
    python = blocks(section(readme, "The loader in your own training loop"), "python")
    # the training-loop snippet and the masking rule's; the mixture example names paths of your own
    for snippet in [python[0], *(b for b in python if "mask_batch(" in b)]:
        done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"README snippet failed:\n{snippet}\n--- stderr ---\n{done.stderr[-3000:]}"
