"""The Beam internals maskstream reaches into, fenced: the local runner, the state sampler's period, the import hook.

Each reach checks what it assumes (a parameter by name, a version) before it acts, warns and does nothing when
that does not hold, and undoes itself when the job ends (a context manager).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import warnings

LOCAL_SAMPLING_MS = 10
SAMPLING_PARAM = "sampling_period_ms"


def local_runner(options):
    """The FnApiRunner as SwitchingDirectRunner would build it for a batch job, minus its Prism attempt."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)


@contextlib.contextmanager
def fast_state_sampler(period_ms: int = LOCAL_SAMPLING_MS, *, sampler_class=None):
    """While the job runs, StateSampler's default sampling_period_ms is period_ms; restored afterwards.

    NOTE: every bundle ends by joining Beam's state-sampler thread, which sleeps up to its period (200 ms by
    default) before it notices. Its samples only feed msecs counters. Beam has no option for it, and the
    default is bound into the constructor, hence this. Yields True when patched, False when it fell back.
    """
    if sampler_class is None:
        from apache_beam.runners.worker import statesampler
        sampler_class = statesampler.StateSampler
    init = sampler_class.__init__
    try:
        params = list(inspect.signature(init).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params]
    param = params[names.index(SAMPLING_PARAM)] if SAMPLING_PARAM in names else None
    with_defaults = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty]
    if (param is None or param not in with_defaults or not isinstance(param.default, int)
            or len(getattr(init, "__defaults__", None) or ()) != len(with_defaults)):
        warnings.warn(f"{sampler_class.__qualname__}.__init__ has no int default {SAMPLING_PARAM!r} where "
                      f"maskstream expects it (this Beam version differs); keeping Beam's sampling period, "
                      f"so each bundle may end up to 200 ms later", RuntimeWarning, stacklevel=3)
        yield False
        return
    saved = init.__defaults__
    defaults = list(saved)
    defaults[with_defaults.index(param)] = period_ms
    init.__defaults__ = tuple(defaults)
    try:
        yield True
    finally:
        init.__defaults__ = saved


class HidePackages:
    """A sys.meta_path finder that makes the named packages look uninstalled."""
    def __init__(self, packages: tuple[str, ...]):
        self.packages = packages

    def find_spec(self, name, path=None, target=None):
        if any(name == p or name.startswith(p + ".") for p in self.packages):
            raise ModuleNotFoundError(f"{name} is not loaded by this run (local runner, local files)", name=name)
        return None


@contextlib.contextmanager
def hidden_packages(packages: tuple[str, ...]):
    """Hide packages for the job's duration; the finder is removed when the job ends (or fails)."""
    if not packages:
        yield
        return
    finder = HidePackages(packages)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(finder)


@contextlib.contextmanager
def logging_disabled(level: int = logging.WARNING):
    """logging.disable(level) for a block; the previous setting is restored in a finally."""
    previous = logging.root.manager.disable
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(previous)
