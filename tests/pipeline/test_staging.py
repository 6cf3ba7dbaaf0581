"""Datasets are replaced, never destroyed: staging + swap, a real SIGKILL, the lock, inputs inside OUT, memory://."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_sotu_subset

from maskstream.errors import UserError
from maskstream.loader import format as fmt
from maskstream.loader.inspector import main as inspect_main
from maskstream.pipeline import run as pipeline_run
from maskstream.pipeline import shards, staging, store

ROOT = Path(__file__).resolve().parents[2]
IN_MEMORY = ("--direct_running_mode", "in_memory")
KILL_DOCS = 120          # about half of SOTU: a few seconds of work, so the kill lands mid-run
KILL_SHARDS = 32         # many shards: the window in which shards are being written is wide


def siblings(out: Path) -> list[str]:
    """What runs leave beside OUT: staging folders, old folders, locks."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def verifies(out) -> bool:
    return inspect_main([str(out), "--verify"]) == 0


@pytest.fixture(scope="module")
def dataset(sotu_subset, bert_json, tmp_path_factory):
    """One real run (SOTU subset, 2 shards, in_memory): (folder, index); tests copy it with copy_dataset."""
    out = tmp_path_factory.mktemp("staging") / "out"
    return out, pipeline_run.run(["--input", str(sotu_subset), "--tokenizer", str(bert_json), "--output", str(out),
                                  "--quiet", *IN_MEMORY, "--num-shards", "2"])


def copy_dataset(dataset, dst: Path) -> Path:
    """The dataset as a run into dst would have written it (index.json records its output folder)."""
    src, index = dataset
    shutil.copytree(src, dst)
    index = json.loads(json.dumps(index))
    index["config"]["shard"]["output"] = str(dst)
    (dst / "index.json").write_bytes(fmt.dump_index(index))
    return dst


@pytest.mark.slow
def test_copy_dataset_gives_what_a_run_writes(dataset, sotu_subset, bert_json, tmp_path, job, hashes):
    job([sotu_subset], bert_json, tmp_path / "out", *IN_MEMORY, "--num-shards", 2)
    ran = hashes(tmp_path / "out")
    shutil.rmtree(tmp_path / "out")
    assert hashes(copy_dataset(dataset, tmp_path / "out")) == ran


def failing_write_shard(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.slow
def test_a_failed_run_leaves_the_previous_dataset_as_it_was(dataset, sotu_subset, bert_json, tmp_path, job, hashes,
                                                           monkeypatch):
    out = copy_dataset(dataset, tmp_path / "out")
    before = hashes(out)
    monkeypatch.setattr(shards, "write_shard", failing_write_shard)       # the job fails writing its shards
    with pytest.raises(Exception, match="No space left"):
        job([sotu_subset], bert_json, out, *IN_MEMORY, "--num-shards", 2)
    assert hashes(out) == before and siblings(out) == []                 # staging removed, lock released
    assert verifies(out)


def test_inputs_inside_the_output_are_refused_before_anything_is_touched(dataset, sotu_subset, bert_json, tmp_path,
                                                                         job, hashes):
    out = copy_dataset(dataset, tmp_path / "out")
    before = hashes(out)
    for inside in (out / "rejects" / "more.jsonl", out / "more.jsonl",
                   tmp_path / ".out.staging-1-2-3" / "more.jsonl"):
        inside.parent.mkdir(exist_ok=True)
        inside.write_bytes(sotu_subset.read_bytes())
        with pytest.raises(UserError, match="lies inside --output"):
            job([inside], bert_json, out, *IN_MEMORY, "--num-shards", 2, "--overwrite")
        assert inside.read_bytes() == sotu_subset.read_bytes()
        inside.unlink()
    assert hashes(out) == before


@pytest.mark.slow
def test_a_run_that_writes_nothing_keeps_the_dataset_and_names_its_rejects(dataset, bert_json, tmp_path, hashes,
                                                                          capsys):
    from maskstream import cli
    out = copy_dataset(dataset, tmp_path / "out")
    before = hashes(out)
    (tmp_path / "bad.jsonl").write_bytes(b'{"title": "no text"}\n')
    rc = cli.main(["preprocess", "--input", str(tmp_path / "bad.jsonl"), "--tokenizer", str(bert_json), "--output",
                   str(out), "--quiet", *IN_MEMORY, "--num-shards", "2", "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and f"{out} keeps its dataset" in err
    staged = err.split("See ")[1].split(" (")[0]
    assert Path(staged).read_text().count("missing_field") == 1 and hashes(out) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        staging.plan(str(tmp_path / "file"), "x")


@pytest.mark.slow
@pytest.mark.parametrize("swap", [True, False])
def test_overwrite_keeps_foreign_files_across_the_swap(dataset, sotu_subset, bert_json, tmp_path, monkeypatch, swap):
    out = copy_dataset(dataset, tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    (out / "rejects" / "triage.txt").write_text("also mine")
    (out / "shard-000099.tar").write_text("a shard-like file of mine")
    real_commit = staging.commit

    def commit_after_a_user_adds_a_file(layout, foreign):
        (out / "added-during-the-run.txt").write_text("mine too")
        real_commit(layout, foreign)
    monkeypatch.setattr(staging, "commit", commit_after_a_user_adds_a_file)
    index = pipeline_run.run(["--input", str(sotu_subset), "--tokenizer", str(bert_json), "--output", str(out),
                              "--quiet", *IN_MEMORY, "--num-shards", "1", "--overwrite"], swap=swap)
    assert (out / "notes.txt").read_text() == "mine" and (out / "rejects" / "triage.txt").read_text() == "also mine"
    assert (out / "added-during-the-run.txt").exists() and (out / "shard-000099.tar").exists()
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar", "shard-000099.tar"]
    assert index["config"]["shard"]["output"] == str(out) and siblings(out) == []
    assert [e["name"] for e in index["shards"]] == ["shard-000000.tar"]


@pytest.mark.slow
def test_without_the_exchange_two_renames_swap_and_a_cut_between_them_is_repaired(dataset, sotu_subset, bert_json,
                                                                                  tmp_path, job, hashes, monkeypatch):
    out = copy_dataset(dataset, tmp_path / "out")
    clean = hashes(out)
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    job([sotu_subset], bert_json, out, *IN_MEMORY, "--num-shards", 2)
    assert hashes(out) == clean and siblings(out) == []
    out.rename(tmp_path / ".out.old-20260101-000000-1-abc")         # killed between the two renames
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".out.lock.20260101-000000-{dead.pid}-abc").write_text("{")   # killed while taking the lock
    layout = staging.plan(str(out), "x")
    staging.clean_leftovers(layout)
    assert hashes(out) == clean and siblings(out) == []


def test_a_staged_dataset_that_does_not_verify_is_not_put_in_place(dataset, tmp_path):
    out = copy_dataset(dataset, tmp_path / "out")
    index = dataset[1]
    staging.verify(str(out), index)
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="shard-000001.tar: sha256 differs"):
        staging.verify(str(out), index)
    (out / "shard-000007.tar").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="shard-000007.tar: not listed"):
        staging.verify(str(out), index)


@pytest.mark.slow
def test_a_live_runs_lock_refuses_a_second_run_and_a_dead_ones_is_taken_over(sotu_subset, bert_json, tmp_path,
                                                                             job, capsys):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = Path(staging.lock_path(str(out)))
        holder = {"pid": sleeper.pid, "host": os.uname().nodename, "started": "2026-01-01T00:00:00",
                  "command": "maskstream preprocess --output out", "run": "other"}
        lock.write_text(json.dumps(holder))
        with pytest.raises(UserError, match=f"held by a running preprocess \\(pid {sleeper.pid} on "):
            job([sotu_subset], bert_json, out, *IN_MEMORY, "--num-shards", 2)
        assert not out.exists() and lock.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    capsys.readouterr()
    job([sotu_subset], bert_json, out, *IN_MEMORY, "--num-shards", 2)    # now the holder is dead
    assert f"taking over {lock} of a dead run (pid {sleeper.pid}" in capsys.readouterr().err
    assert not lock.exists() and verifies(out)


@pytest.mark.slow
def test_object_store_output_commits_in_place_with_index_json_last(dataset, sotu_subset, bert_json, tmp_path, job,
                                                                   monkeypatch):
    pytest.importorskip("fsspec")
    url = f"memory://maskstream-test/{tmp_path.name}/out"
    index = job([sotu_subset], bert_json, url, *IN_MEMORY, "--num-shards", 2)
    local = dataset[1]
    got = store.files(url)
    assert sorted(got) == sorted(["index.json", "tokenizer.json", "rejects/rejects.jsonl",
                                  *(e["name"] for e in local["shards"])])
    assert [e["sha256"] for e in index["shards"]] == [e["sha256"] for e in local["shards"]]
    assert index["config"]["shard"]["output"] == url
    before = {rel: store.read(store.join(url, rel)) for rel in got}
    monkeypatch.setattr(shards, "write_shard", failing_write_shard)
    with pytest.raises(Exception, match="No space left"):
        job([sotu_subset], bert_json, url, *IN_MEMORY, "--num-shards", 2)
    assert {rel: store.read(store.join(url, rel)) for rel in store.files(url)} == before   # untouched, no leftovers
    monkeypatch.undo()
    with pytest.raises(UserError, match="holds another dataset"):
        job([sotu_subset], bert_json, url, *IN_MEMORY, "--num-shards", 1)
    index = job([sotu_subset], bert_json, url, *IN_MEMORY, "--num-shards", 1, "--overwrite")
    names = sorted(rel for rel in store.files(url) if rel.startswith("shard-"))
    assert names == ["shard-000000.tar"] == [e["name"] for e in index["shards"]]   # the old second shard is gone
    assert fmt.read_index(store.read(store.join(url, "index.json")))["counts"] == index["counts"]


@pytest.mark.slow
def test_a_local_folder_that_cannot_be_renamed_commits_in_place_too(dataset, sotu_subset, bert_json, tmp_path,
                                                                    hashes):
    out = copy_dataset(dataset, tmp_path / "out")
    clean = hashes(out)
    (out / ".staging-20260101-000000-9-abc").mkdir()                   # what a killed in-place run left
    (out / ".staging-20260101-000000-9-abc" / "shard-000000.tar.partial").write_bytes(b"half")
    pipeline_run.run(["--input", str(sotu_subset), "--tokenizer", str(bert_json), "--output", str(out), "--quiet",
                      *IN_MEMORY, "--num-shards", "2"], swap=False)
    assert hashes(out) == clean and siblings(out) == []


@pytest.fixture
def half_sotu(tmp_path) -> Path:
    return write_sotu_subset(tmp_path / "half-sotu.jsonl", KILL_DOCS)


@pytest.mark.slow
def test_a_run_sigkilled_mid_write_leaves_the_old_dataset_verifiable_and_a_rerun_cleans_up(
        half_sotu, bert_json, tmp_path, job, hashes, capsys):
    out = tmp_path / "out"
    flags = ("--num-shards", KILL_SHARDS)
    job([half_sotu], bert_json, out, *flags)
    clean = hashes(out)
    argv = [sys.executable, "-m", "maskstream.pipeline.run", "--input", str(half_sotu), "--tokenizer", str(bert_json),
            "--output", str(out), "--quiet", *map(str, flags)]
    proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    lock = Path(staging.lock_path(str(out)))
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and not lock.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        with pytest.raises(UserError, match=f"held by a running preprocess \\(pid {proc.pid} "):
            job([half_sotu], bert_json, out, *flags)                 # a second run while the first holds OUT
        while proc.poll() is None and time.monotonic() < deadline:
            staged = [p for p in tmp_path.glob(".out.staging-*/shard-*")]
            if staged:
                break                                    # a .partial or the first shard: writing has begun
            time.sleep(0.002)
        assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        os.killpg(proc.pid, signal.SIGKILL)              # the whole group: a multi-process run's workers too
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert hashes(out) == clean and verifies(out)        # the previous dataset, whole and readable
    left = siblings(out)
    assert ".out.lock" in left and any(n.startswith(".out.staging-") for n in left)
    capsys.readouterr()
    job([half_sotu], bert_json, out, *flags)
    assert f"taking over {lock} of a dead run (pid {proc.pid}" in capsys.readouterr().err
    assert hashes(out) == clean and siblings(out) == []


DISK_FULL = r"""
import json, os, subprocess, sys
d, size, argv = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d], check=True)
out = os.path.join(d, "out")
run = lambda: subprocess.run([sys.executable, "-m", "maskstream.pipeline.run", *argv, "--output", out],
                             capture_output=True, text=True)
first, second = run(), run()
verify = subprocess.run([sys.executable, "-m", "maskstream.cli", "inspect", out, "--verify"], capture_output=True)
print(json.dumps({"first": first.returncode, "second": second.returncode, "err": second.stderr[-3000:],
                  "verify": verify.returncode, "left": sorted(os.listdir(d))}))
"""


@pytest.mark.slow
def test_disk_full_while_staging_leaves_the_previous_dataset_whole(sotu_subset, bert_json, tmp_path, job):
    """A real tmpfs (a private mount namespace) with room for one dataset but not two: the rerun fails."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here (unshare -rm: {probe.stderr.decode().strip()})")
    flags = ["--input", str(sotu_subset), "--tokenizer", str(bert_json), "--quiet", *IN_MEMORY, "--num-shards", "2"]
    job([sotu_subset], bert_json, tmp_path / "sized", *IN_MEMORY, "--num-shards", 2)
    size = sum(p.stat().st_size for p in (tmp_path / "sized").rglob("*") if p.is_file())
    mount = tmp_path / "mnt"
    mount.mkdir()
    res = subprocess.run(["unshare", "-rm", sys.executable, "-c", DISK_FULL, str(mount), str(size * 3 // 2 + 65536),
                          json.dumps(flags)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["first"] == 0 and got["second"] != 0, got
    assert "No space left on device" in got["err"] and got["verify"] == 0, got
    assert got["left"] == ["out"], got                 # staging removed, lock released


def test_a_lock_whose_pid_now_names_another_process_or_is_from_another_boot_is_taken_over(tmp_path, capsys):
    """A pid is reused after its process dies: the lock records the holder's start time and boot, so a live
    process that is not the holder does not keep OUT locked forever."""
    out = tmp_path / "out"
    lock = Path(staging.lock_path(str(out)))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"pid": sleeper.pid, "host": os.uname().nodename, "started": "2026-01-01T00:00:00",
                  "command": "maskstream preprocess --output out", "run": "other",
                  "pid_start": staging.process_start(sleeper.pid), "boot": staging.boot_id()}
        assert holder["pid_start"] is not None and holder["boot"]
        lock.write_text(json.dumps(holder))
        with pytest.raises(UserError, match=f"held by a running preprocess \\(pid {sleeper.pid} on "):
            staging.Lock(str(out), ["maskstream", "preprocess"], "mine").__enter__()
        for reused in ({"pid_start": holder["pid_start"] - 1}, {"boot": "another-boot"}):
            lock.write_text(json.dumps(holder | reused))
            with staging.Lock(str(out), ["maskstream", "preprocess"], "mine"):
                assert json.loads(lock.read_text())["run"] == "mine"
            assert f"taking over {lock} of a dead run (pid {sleeper.pid}" in capsys.readouterr().err
            assert not lock.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
