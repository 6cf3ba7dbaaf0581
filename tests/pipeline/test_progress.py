"""Progress with honest totals: the bytes the readers will go through, shown as a bar or as periodic log lines."""
import gzip
import io
import time

from tqdm import tqdm

from maskstream.pipeline import progress, readers
from maskstream.pipeline.tokenizer import sample_texts


def test_off_a_terminal_the_bar_is_a_log_line_every_few_seconds_against_the_total():
    stream = io.StringIO()
    with progress.Bar(10_000_000, tty=False, every_s=0.2, stream=stream):
        progress.Reporter().add(5_000_000)   # what a worker reports, through the folder
        time.sleep(1.0)
    lines = stream.getvalue().splitlines()
    assert lines and lines[-1].startswith("preprocess: read 5.0 of 10.0 MB (50%)"), lines


def test_totals_are_the_bytes_the_readers_go_through(tmp_path, capsys):
    text = b"".join(b'{"text": "document %d ' % i + b"word " * i + b'"}\n' for i in range(300))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(text))
    (tmp_path / "b.jsonl").write_bytes(text)
    files = readers.expand_inputs([str(tmp_path / "*.jsonl*")])
    assert [readers.text_size(f.path, f.size) for f in files] == [len(text), len(text)]
    read = sum(readers.record_bytes(r) for f in files for r in readers.iter_raw_records(f.path, _source(f.path)))
    assert read == 2 * len(text)
    # tokenizer training: the bar's total is what it will read (each file's share of --sample-bytes), and it
    # ends there, not at the cap
    assert len(list(sample_texts([str(tmp_path / "*.jsonl*")], text_field="text", sample_bytes=10**9))) == 600
    total = tqdm.format_sizeof(2 * len(text))
    err = capsys.readouterr().err
    assert f"0.00/{total}" in err and f"{total}/{total}" in err, err   # known from the start, reached at the end
    list(sample_texts([str(tmp_path / "*.jsonl*")], text_field="text", sample_bytes=len(text)))
    bar = capsys.readouterr().err.split("\r")[-1]
    assert "100%" in bar, bar


def _source(path):
    from maskstream.pipeline.config import SourceConfig
    return SourceConfig(inputs=(path,))
