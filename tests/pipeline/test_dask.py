"""The job on a real dask.distributed cluster (a scheduler and two worker processes on 127.0.0.1): the same
bytes as the local runner; and the fenced fix of Beam's Dask ParDo translation (pipeline/dask_runner.py)."""
from __future__ import annotations

import apache_beam as beam
import pytest

from maskstream.pipeline import dask_runner
from maskstream.pipeline import run as pipeline_run

distributed = pytest.importorskip("distributed")


class _Buffering(beam.DoFn):
    """Emits only in finish_bundle, as Tokenize does with its last batch."""
    def start_bundle(self):
        self.seen = []

    def process(self, x):
        self.seen.append(x)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows
        yield GlobalWindows.windowed_value(sum(self.seen))


def _recipe(fn):
    return dask_runner._Recipe("Buffering", fn, None, (), {}, None)


def test_a_partition_keeps_what_finish_bundle_emits_and_starts_with_no_earlier_output():
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue
    items = [WindowedValue(i, 0, (GlobalWindow(),)) for i in (1, 2, 3)]
    recipe = _recipe(_Buffering())
    assert dask_runner.run_partition(items, recipe) == [6]     # Beam 2.77's own translation returns []
    assert dask_runner.run_partition(items[:1], recipe) == [1]  # the same recipe again: nothing carried over


def test_short_and_long_runner_names_select_the_fixed_dask_runner():
    for name in ("DaskRunner", "dask", "Dask"):
        options, runner = pipeline_run.pipeline_options([f"--runner={name}", "--dask_client_address=127.0.0.1:1"],
                                                        files=3)
        assert runner is not None and type(runner).__name__ == "DaskRunner"
        assert options.get_all_options()["npartitions"] == 3          # the input files spread over the workers
    pipeline_run.check_beam_flags(["--dask_client_address=127.0.0.1:1"])  # Beam's DaskOptions are known flags


@pytest.fixture(scope="module")
def cluster():
    # NOTE: processes, not threads: each worker unpickles the graph it is sent, as on a real cluster
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as c:
        yield c.scheduler_address


@pytest.fixture
def two_files(tmp_path, sotu_subset):
    """Two JSONL files (the SOTU subset split in two) and one with bad records, so every branch has data."""
    lines = sotu_subset.read_text().splitlines(keepends=True)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(lines[:6]))
    (tmp_path / "in" / "b.jsonl").write_text("".join(lines[6:]) + '{"text": 42}\nnot json\n')
    return [tmp_path / "in" / "a.jsonl", tmp_path / "in" / "b.jsonl"]


@pytest.mark.slow
def test_dask_cluster_writes_the_local_runners_bytes(cluster, two_files, bert_json, tmp_path, job, hashes):
    from apache_beam.runners.dask import transform_evaluator
    flags = ("--num-shards", 3)
    on_dask = job(two_files, bert_json, tmp_path / "dask", "--runner=DaskRunner",
                  f"--dask_client_address={cluster}", *flags)
    local = job(two_files, bert_json, tmp_path / "local", "--direct_running_mode=in_memory", *flags)
    assert on_dask["counts"] == local["counts"] and local["counts"]["documents_rejected"] == 2
    a, b = hashes(tmp_path / "dask"), hashes(tmp_path / "local")
    assert {k: v for k, v in a.items() if k != "index.json"} == {k: v for k, v in b.items() if k != "index.json"}
    assert on_dask["shards"] == local["shards"]
    assert transform_evaluator.TRANSLATIONS[beam.ParDo] is transform_evaluator.ParDo   # Beam's table restored
