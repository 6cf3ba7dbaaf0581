"""Local execution modes (auto choice, flags) and a real crash: the job SIGKILLed mid-write, then rerun."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_sotu_subset

from maskstream.pipeline import local_runner, packing, readers
from maskstream.pipeline import run as pipeline_run
from maskstream.pipeline.encoder import Encoder
from maskstream.pipeline.tokenizer import TokenizerRef, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
KILL_DOCS = 120          # about half of SOTU: a few seconds of work, so the kill lands mid-run
KILL_SHARDS = 32         # many shards: the window in which shards are being written is wide


def test_auto_mode_is_one_process_on_few_cores_or_small_inputs():
    assert pipeline_run.auto_mode(2, 10 << 30) == "in_memory"
    assert pipeline_run.auto_mode(16, 10 << 20) == "in_memory"
    assert pipeline_run.auto_mode(16, 10 << 30) == "multi_processing"


def test_hidden_packages_and_quiet_logging_are_undone_after_the_block():
    import logging
    import sys
    finders, disabled = list(sys.meta_path), logging.root.manager.disable
    with pytest.raises(RuntimeError):
        with local_runner.hidden_packages(("maskstream_no_such_pkg",)), local_runner.logging_disabled():
            assert isinstance(sys.meta_path[0], local_runner.HidePackages)
            with pytest.raises(ModuleNotFoundError):
                import maskstream_no_such_pkg  # noqa: F401
            assert logging.root.manager.disable == logging.WARNING
            raise RuntimeError("the job failed")
    assert sys.meta_path == finders and logging.root.manager.disable == disabled


def test_package_hiding_steps_aside_with_a_warning_on_a_beam_release_it_was_not_measured_on(monkeypatch):
    import sys
    assert local_runner.beam_is_tested()      # the pinned release
    monkeypatch.setattr(local_runner, "beam_version", lambda: "9.0.0")
    finders = list(sys.meta_path)
    with pytest.warns(RuntimeWarning, match="apache-beam 9.0.0"):
        with local_runner.hidden_packages(("maskstream_no_such_pkg",)):
            assert sys.meta_path == finders   # nothing hidden: every package imports as usual
    assert sys.meta_path == finders


def test_local_mode_contradicting_beams_running_mode_is_refused():
    with pytest.raises(ValueError, match="contradicts"):
        pipeline_run.pipeline_options(["--direct_running_mode=multi_processing"], local_mode="in_memory")
    options, runner = pipeline_run.pipeline_options(["--direct_running_mode=in_memory"], local_mode="in_memory")
    assert runner is not None and options.get_all_options()["direct_running_mode"] == "in_memory"


def test_several_groups_in_one_encode_call_equal_one_call_per_group(bert_json, sotu_texts):
    tok, _, _ = load_tokenizer(str(bert_json))
    encoder = Encoder(tok)
    groups = [[readers.Doc("f", g * 10 + i, 0, g, t) for i, t in enumerate(sotu_texts[g * 3:g * 3 + 3])]
              for g in range(3)]
    groups[1].append(readers.Doc("f", 19, 0, 1, "\u200b"))       # no tokens: rejected in its own group
    together = packing.tokenize_groups(encoder, groups)
    for docs, (tokdocs, rejects) in zip(groups, together, strict=False):
        alone, alone_rejects = packing.tokenize_group(encoder, docs)
        assert [d.position for d in tokdocs] == [d.position for d in alone] and rejects == alone_rejects
        assert all((a.ids == b.ids).all() and (a.word_starts == b.word_starts).all()
                   for a, b in zip(tokdocs, alone, strict=False))
    assert [r.position for r in together[1][1]] == [19]


@pytest.fixture
def half_sotu(tmp_path) -> Path:
    return write_sotu_subset(tmp_path / "half-sotu.jsonl", KILL_DOCS)


@pytest.mark.slow
def test_job_killed_mid_write_then_rerun_leaves_exactly_the_clean_runs_files(half_sotu, bert_json, tmp_path,
                                                                             job, hashes):
    out = tmp_path / "out"
    flags = ("--num-shards", KILL_SHARDS)
    job([half_sotu], bert_json, out, *flags)
    clean = hashes(out)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    argv = [sys.executable, "-m", "maskstream.pipeline.run", "--input", str(half_sotu), "--tokenizer", str(bert_json),
            "--output", str(out), "--quiet", *map(str, flags)]
    proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if out.is_dir() and any(n.startswith("shard-") for n in os.listdir(out)):
                break                                    # a .partial or the first shard: writing has begun
            time.sleep(0.002)
        assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        os.killpg(proc.pid, signal.SIGKILL)              # the whole group: a multi-process run's workers too
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "index.json").exists(), "killed after index.json was written: widen KILL_SHARDS"
    assert any(p.name.startswith("shard-") for p in out.iterdir())   # e.g. shard-000000.tar.partial
    job([half_sotu], bert_json, out, *flags)
    assert hashes(out) == clean


def test_tokenizer_read_by_path_must_not_change_while_the_job_runs(bert_json, tmp_path):
    copy = tmp_path / "tok.json"
    copy.write_bytes(bert_json.read_bytes())
    ref = TokenizerRef.of(copy.read_text(), path=str(copy))
    inline = TokenizerRef.of(copy.read_text())
    assert ref.data is None and inline.path is None and ref.text() == inline.text() == copy.read_text()
    copy.write_text(copy.read_text().replace('"[MASK]"', '"[MASQ]"'))
    with pytest.raises(RuntimeError, match="changed while the job ran"):
        ref.text()


@pytest.mark.slow
def test_local_runs_on_local_text_files_leave_beams_cloud_clients_and_pyarrow_unloaded(
        sotu_subset, bert_json, tmp_path, hashes, job):
    base = ["--input", str(sotu_subset), "--tokenizer", str(bert_json)]
    assert pipeline_run.unneeded_packages([*base, "--output", "out"]) == (*pipeline_run.CLOUD_CLIENTS, "pyarrow")
    assert pipeline_run.unneeded_packages([*base, "--input", "x/*", "--output", "o"]) == pipeline_run.CLOUD_CLIENTS
    assert not pipeline_run.unneeded_packages([*base, "--output", "gs://bucket/out"])
    assert not pipeline_run.unneeded_packages([*base, "--output", "out", "--runner", "DataflowRunner"])
    # NOTE: google.cloud itself, an empty namespace package, is made at start-up by the packages' .pth files
    probe = ("import sys; from pipeline import run; run.main(sys.argv[1:]); "
             "print(sorted({m.split('.')[0] + '.' + m.split('.')[1] for m in sys.modules "
             "if m.startswith(('google.cloud.', 'apache_beam.io.gcp', 'pymongo.', 'pyarrow.'))}))")
    proc = subprocess.run([sys.executable, "-c", probe, *base, "--output", str(tmp_path / "a"), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]" and "WARNING" not in proc.stderr, proc.stderr[-2000:]
    job([sotu_subset], bert_json, tmp_path / "b")                    # in this process, everything loaded
    tars = {k: v for k, v in hashes(tmp_path / "a").items() if k.endswith(".tar")}
    assert tars and tars == {k: v for k, v in hashes(tmp_path / "b").items() if k.endswith(".tar")}
