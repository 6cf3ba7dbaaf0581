"""Local execution modes (auto choice, flags); a real SIGKILL mid-write is in test_staging.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from maskstream.pipeline import local_runner, packing, readers
from maskstream.pipeline import run as pipeline_run
from maskstream.pipeline.encoder import Encoder
from maskstream.pipeline.tokenizer import TokenizerRef, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


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
