"""`python -m maskstream.trainer ...` / `torchrun --nproc_per_node=N -m maskstream.trainer ...`.

The same flags as `maskstream train`.
"""
import sys

from maskstream.trainer.train import main

if __name__ == "__main__":
    from maskstream.errors import run_command
    sys.exit(run_command("maskstream train", main))
