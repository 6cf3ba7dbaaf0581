"""`python -m trainer ...` / `torchrun --nproc_per_node=N -m trainer ...`: the same flags as `maskstream train`."""
import sys

from trainer.train import main

if __name__ == "__main__":
    sys.exit(main())
