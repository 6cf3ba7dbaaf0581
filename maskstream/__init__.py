"""maskstream: streaming MLM pre-training data — a Beam job writes verified shards, a torch loader masks on the device.

The public API is imported lazily, so `import maskstream` alone loads neither torch nor Apache Beam:

    from maskstream import MLMLoader, LoaderConfig, MaskingConfig, Mixture, MixSource
    maskstream.preprocess(inputs, tokenizer, output, seq_len=128, ...)   # the CLI's flags in snake_case
    maskstream.train_tokenizer(inputs, output, vocab_size=8000, ...)

Subpackages: `maskstream.pipeline` (the Beam job), `maskstream.loader` (format, masking, streaming),
`maskstream.trainer` (the MLM encoder and its loop), `maskstream.workflows` (demo and experiment).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "MLMLoader": "maskstream.loader.stream",
    "LoaderConfig": "maskstream.loader.stream",
    "MaskingConfig": "maskstream.loader.maskconfig",
    "Mixture": "maskstream.loader.mixture",
    "MixSource": "maskstream.loader.mixture",
    "preprocess": "maskstream.api",
    "train_tokenizer": "maskstream.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'maskstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value     # later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
