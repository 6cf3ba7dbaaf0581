"""Flex template entry point: `python main.py --input ... --output ...` runs maskstream.pipeline.run.main.

A separate file because running pipeline/run.py as a script would put pipeline/ itself on sys.path, where
its module names (config, readers, ...) could shadow other packages.
"""
import sys

from maskstream.pipeline.run import main

if __name__ == "__main__":
    sys.exit(main())
