"""The job on a real dask.distributed cluster (a scheduler and two worker processes on 127.0.0.1): the same
bytes as the local runner; and the fenced fix of Beam's Dask ParDo translation (pipeline/dask_runner.py)."""
from __future__ import annotations

import json
import os

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


@pytest.mark.slow
def test_an_unreachable_scheduler_ends_in_one_line_naming_it(sotu_subset, bert_json, tmp_path, job):
    from helpers import free_port

    from maskstream.errors import UserError
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=f"cannot reach the Dask scheduler at {address}"):
        job([sotu_subset], bert_json, tmp_path / "out", "--runner=dask", f"--dask_client_address={address}",
            "--dask_connection_timeout=2")


@pytest.fixture(scope="module")
def cluster():
    # NOTE: processes, not threads: each worker unpickles the graph it is sent, as on a real cluster
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as c:
        yield c.scheduler_address


@pytest.fixture
def curated_inputs(tmp_path, planted):
    """The planted copies (tests/pipeline/conftest.py) and a third file of a bulleted list, malformed JSON and
    a non-string field, so every branch has data: dedup, filter and clean rejects across workers."""
    bullets = "\n".join(f"• item {i} of the list of the things to do" for i in range(60))
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": bullets}) + '\n{"text": 42}\nnot json\n')
    return [*planted, tmp_path / "c.jsonl"]


@pytest.mark.slow
def test_dask_cluster_writes_the_local_runners_bytes(cluster, curated_inputs, bert_json, tmp_path, job, hashes):
    from apache_beam.runners.dask import transform_evaluator
    flags = ("--num-shards", 3, "--dedup", "minhash", "--filters", "gopher")
    on_dask = job(curated_inputs, bert_json, tmp_path / "dask", "--runner=DaskRunner",
                  f"--dask_client_address={cluster}", *flags)
    local = job(curated_inputs, bert_json, tmp_path / "local", "--direct_running_mode=in_memory", *flags)
    assert on_dask["counts"] == local["counts"]
    assert local["counts"]["rejects_by_reason"] == {"malformed_json": 1, "non_string_field": 1, "quality": 1,
                                                    "duplicate": 2, "near_duplicate": 1}
    assert local["counts"]["quality_bullet_lines"] == 1
    a, b = hashes(tmp_path / "dask"), hashes(tmp_path / "local")
    assert {k: v for k, v in a.items() if k != "index.json"} == {k: v for k, v in b.items() if k != "index.json"}
    assert on_dask["shards"] == local["shards"]
    assert transform_evaluator.TRANSLATIONS[beam.ParDo] is transform_evaluator.ParDo   # Beam's table restored


@pytest.mark.slow
def test_a_reshuffle_spreads_one_files_partition_over_every_worker(cluster, tmp_path):
    """Beam 2.77 makes Reshuffle a no-op on Dask, so one input file would be tokenized by one worker thread;
    the fenced translation splits each partition into pieces over the cluster's threads."""
    from apache_beam.options.pipeline_options import PipelineOptions
    out = str(tmp_path)

    def note_worker(x):  # nested: pickled by value, as the workers cannot import this test module
        import os
        import time
        time.sleep(0.05)
        with open(os.path.join(out, f"{x}-{os.getpid()}"), "w"):
            pass
        return x

    options = PipelineOptions([f"--dask_client_address={cluster}", "--dask_npartitions=1"])
    with beam.Pipeline(runner=dask_runner.dask_runner(), options=options) as p:
        _ = p | beam.Create(["one file"]) | beam.FlatMap(lambda _: range(64)) | beam.Reshuffle() | beam.Map(note_worker)
    done = [name.split("-") for name in os.listdir(out)]
    assert sorted(int(x) for x, _ in done) == list(range(64))     # every element once
    assert len({pid for _, pid in done}) == 2, "one worker did all the work"
