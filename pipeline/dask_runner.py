"""The Dask runner maskstream runs on: Beam's DaskRunner with its ParDo translation fixed, fenced here.

`--runner=DaskRunner --dask_client_address=HOST:PORT` (or `--runner=dask`) runs the job on a
`dask.distributed` cluster. What Beam 2.77's DaskRunner (apache_beam/runners/dask) gets wrong, and how:
  1. a ParDo's tagged outputs are not separated: they all reach every consumer as main output;
  2. `run_pipeline` computes only the last transform's lineage: a branch not feeding it never runs;
  3. `metrics()` raises NotImplementedError;
  4. outputs a DoFn emits in `finish_bundle` are dropped: a partition's results are collected before
     finish_bundle runs (`apply_dofn_to_bundle`), so Tokenize's last batch of every partition would vanish;
  5. a ParDo's receivers (one list) are built once, in the graph, and every partition that a worker
     deserializes together appends to the same list;
  6. `Reshuffle` is replaced by a transform with no translation, a no-op: a collection keeps its partitions,
     so every pack group of an input file is tokenized in that file's one partition, by one worker thread.
The job's shape avoids 1-3 on every runner (transforms.py: one output per stage, a tagged union filtered
downstream; every branch feeds WriteIndex, the last stage; the summary is built from the data). 4 and 5 are
fixed here: a ParDo translation whose partition function builds its receivers and invoker per partition and
collects the outputs after finish_bundle; a tagged output, which it cannot route, fails loudly. 6 is fixed by a
Reshuffle translation that splits every partition into pieces, SPREAD_PER_THREAD pieces per worker thread of
the cluster in all, which the scheduler runs wherever threads are free. Both are installed in Beam's
translation table only while the graph is translated and restored right after.
"""
from __future__ import annotations

import dataclasses
import typing

from maskstream.errors import UserError

NAMES = ("daskrunner", "dask", "apache_beam.runners.dask.dask_runner.daskrunner")
# _OutputHandler's parameters this module passes: checked before the translation is replaced
SPREAD_PER_THREAD = 2  # pieces per worker thread after a Reshuffle: uneven pieces still even out over threads
OUTPUT_HANDLER_PARAMS = ("window_fn", "main_receivers", "tagged_receivers", "per_element_output_counter",
                         "output_batch_converter", "process_yields_batches", "process_batch_yields_elements")


def is_dask(runner_name: str | None) -> bool:
    return (runner_name or "").lower() in NAMES


def register_options() -> None:
    """Make Beam's DaskOptions (--dask_client_address, ...) known to PipelineOptions, when dask is installed."""
    try:
        import apache_beam.runners.dask.dask_runner  # noqa: F401 -- defines DaskOptions
    except ImportError:
        pass


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """What a partition needs to run a DoFn (one object: dask would walk a list or dict argument)."""
    label: str
    fn: typing.Any
    window_fn: typing.Any
    args: tuple
    kwargs: dict
    side_inputs: typing.Any


def run_partition(items, recipe: _Recipe) -> list:
    """One bundle: setup, start, process each element, finish, teardown; every output, finish_bundle's too."""
    from apache_beam import DoFn
    from apache_beam.pvalue import TaggedOutput
    from apache_beam.runners.common import DoFnContext, DoFnInvoker, DoFnSignature, _OutputHandler
    from apache_beam.runners.dask.transform_evaluator import OneReceiver
    receivers = OneReceiver()       # fresh per partition (5)
    handler = _OutputHandler(window_fn=recipe.window_fn, main_receivers=receivers[None], tagged_receivers=receivers,
                             per_element_output_counter=None, output_batch_converter=None,
                             process_yields_batches=False, process_batch_yields_elements=False)
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(recipe.fn), handler, context=DoFnContext(recipe.label, state=None),
        side_inputs=recipe.side_inputs, input_args=list(recipe.args), input_kwargs=recipe.kwargs,
        user_state_context=None, bundle_finalizer_param=DoFn.BundleFinalizerParam())
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(item)
    invoker.invoke_finish_bundle()      # before collecting (4)
    invoker.invoke_teardown()
    out = []
    for value in receivers.values:
        if isinstance(value, TaggedOutput):
            raise RuntimeError(f"{recipe.label} emitted tagged output {value.tag!r}, which the Dask runner cannot "
                               "route; maskstream's stages emit one output (a tagged union)")
        out.append(value.value)
    return out


def _translation():
    """Beam's ParDo translation with run_partition as its partition function."""
    from apache_beam.runners.dask.transform_evaluator import ParDo, get_windowed_value

    class FixedParDo(ParDo):
        def apply(self, input_bag, side_inputs=None):
            transform = self.transform
            args, kwargs = transform.raw_side_inputs
            main = next(iter(self.applied.main_inputs.values()))
            window_fn = main.windowing.windowfn if hasattr(main, "windowing") else None
            recipe = _Recipe(transform.label, transform.fn, window_fn, tuple(args), dict(kwargs), side_inputs)
            return input_bag.map(get_windowed_value, window_fn).map_partitions(run_partition, recipe)
    return FixedParDo


def _spread_translation():
    """Reshuffle as a spread of every partition into pieces (6); the elements and their order within a piece
    are kept, which is all the job asks of a Reshuffle (its output bytes do not depend on bundles)."""
    from apache_beam.runners.dask.transform_evaluator import DaskBagOp

    class Spread(DaskBagOp):
        def apply(self, input_bag, side_inputs=None):
            pieces = -(-spread_target() // input_bag.npartitions)
            return input_bag.repartition(npartitions=input_bag.npartitions * pieces) if pieces > 1 else input_bag
    return Spread


def spread_target() -> int:
    """Partitions a reshuffled collection is spread over: SPREAD_PER_THREAD per thread of the client's cluster."""
    from distributed import get_client
    try:
        threads = sum(get_client().nthreads().values())
    except ValueError:  # no client in this process
        threads = 1
    return SPREAD_PER_THREAD * max(threads, 1)


def _check_beam():
    """The reach assumes Beam's translation table maps ParDo to its own op and has none for its Reshuffle, and
    _OutputHandler's parameters."""
    import apache_beam as beam
    from apache_beam.runners.common import _OutputHandler
    from apache_beam.runners.dask import transform_evaluator as te
    from apache_beam.runners.dask.overrides import _Reshuffle
    try:    # NOTE: a compiled class: its signature cannot be inspected, so one is built with the arguments used
        _OutputHandler(**dict.fromkeys(OUTPUT_HANDLER_PARAMS))
        fits = te.TRANSLATIONS.get(beam.ParDo) is te.ParDo and _Reshuffle not in te.TRANSLATIONS
    except TypeError:
        fits = False
    if not fits:
        raise UserError("this apache-beam's DaskRunner is not the one maskstream's fix was written for (its ParDo "
                        "translation or _OutputHandler differ); install apache-beam==2.77.0")


def dask_runner():
    """A DaskRunner whose ParDo translation collects every output (see the module doc)."""
    try:
        import dask.distributed  # noqa: F401
        from apache_beam.runners.dask import dask_runner as beam_dask
        from apache_beam.runners.dask import transform_evaluator as te
        from apache_beam.runners.dask.overrides import _Reshuffle
    except ImportError as e:
        raise UserError(f"--runner=DaskRunner needs dask.distributed ({e}); install maskstream[dask]") from e
    import apache_beam as beam

    class DaskRunner(beam_dask.DaskRunner):
        def run_pipeline(self, pipeline, options):
            _check_beam()
            beam_op = te.TRANSLATIONS[beam.ParDo]
            te.TRANSLATIONS[beam.ParDo] = _translation()
            te.TRANSLATIONS[_Reshuffle] = _spread_translation()
            try:
                result = super().run_pipeline(pipeline, options)
            except OSError as e:      # the client could not reach the scheduler: a user's address or cluster
                address = options.view_as(beam_dask.DaskOptions).address or "a new local cluster"
                raise UserError(f"cannot reach the Dask scheduler at {address} ({e}); start the cluster "
                                "(e.g. `dask scheduler` and `dask worker`) or fix --dask_client_address") from e
            finally:
                te.TRANSLATIONS[beam.ParDo] = beam_op     # the graph is built; Beam's table as it was
                te.TRANSLATIONS.pop(_Reshuffle, None)
            return _ClosingResult(result)
    return DaskRunner()


class _ClosingResult:
    """The run's result; closes the dask client once the job has finished (or failed)."""
    def __init__(self, result):
        self.result = result

    def wait_until_finish(self, duration=None):
        try:
            return self.result.wait_until_finish(duration)
        finally:
            self.result.client.close()

    @property
    def state(self):
        return self.result.state
