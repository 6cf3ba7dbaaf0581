"""Other runners: the portable runner against a local job service (the Flink/Spark path), and the Dataflow
graph built offline with --dry_run."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import apache_beam as beam
import pytest
from helpers import free_port

from maskstream.pipeline import run as pipeline_run
from maskstream.pipeline import transforms

STAGES = ("ReadDocuments", "Clean", "Tokenize", "Pack", "AssignShards", "WriteShards", "WriteIndex")


@pytest.fixture
def job_service():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("local job service did not start within 60 s")
    yield f"localhost:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_portable_runner_with_a_local_job_service_writes_the_same_shards(sotu_subset, bert_json, tmp_path,
                                                                          job_service, job, hashes):
    portable = job([sotu_subset], bert_json, tmp_path / "portable", "--runner=PortableRunner",
                   f"--job_endpoint={job_service}", "--environment_type=LOOPBACK", "--num-shards", 2)
    local = job([sotu_subset], bert_json, tmp_path / "local", "--direct_running_mode", "in_memory",
                "--num-shards", 2)
    assert portable["counts"] == local["counts"]
    a, b = hashes(tmp_path / "portable"), hashes(tmp_path / "local")
    assert {k: v for k, v in a.items() if k != "index.json"} == {k: v for k, v in b.items() if k != "index.json"}


@pytest.mark.slow
def test_dataflow_graph_builds_offline_with_dry_run(sotu_subset, bert_json):
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner
    args, beam_args = pipeline_run.parse([
        "--input", str(sotu_subset), "--tokenizer", str(bert_json), "--output", "gs://fake-bucket/shards",
        "--runner=DataflowRunner", "--dry_run=True", "--project=fake-project", "--region=us-central1",
        "--temp_location=gs://fake-bucket/tmp"])
    config, info, text, inputs = pipeline_run.prepare(args)
    options, local = pipeline_run.pipeline_options(beam_args)
    assert local is None                       # Beam picks the runner named by --runner
    runner = DataflowRunner()
    p = beam.Pipeline(runner=runner, options=options)
    transforms.build(p, config=config, info=info, tokenizer_json=text, inputs=inputs)
    result = p.run()
    assert result.state == "DONE"              # dry run: built and checked, not submitted
    names = {t.unique_name.split("/")[0] for t in runner.proto_pipeline.components.transforms.values()}
    assert set(STAGES) <= names
