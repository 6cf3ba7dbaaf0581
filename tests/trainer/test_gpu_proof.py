"""bench/gpu_proof.py --dry: the GPU proof's code paths on the CPU, and its reading of pytest's JUnit report."""
from __future__ import annotations

import pytest
from helpers import build_dataset

from maskstream.bench import gpu_proof


@pytest.mark.slow
def test_the_dry_run_prints_one_table_with_every_figure(tmp_path, capsys):
    data = build_dataset(tmp_path / "data", [[16, 16]])
    junit = tmp_path / "tests.xml"
    junit.write_text('<testsuites><testsuite><testcase name="test_a"/><testcase name="test_b"><failure/>'
                     '</testcase><testcase name="test_c"><skipped/></testcase></testsuite></testsuites>')
    assert gpu_proof.main(["--data", str(data), "--junit", str(junit), "--dry", "--num-workers", "0"]) == 0
    out = capsys.readouterr().out.split("=== GPU proof")[1]
    for row in ("test test_a", "test test_b", "test test_c", "masking per batch, dataset rate",
                "masking per batch, schedule at 30 %", "data wait, share of a step", "tokens/s, tiny fp32, B=4",
                "model-FLOPs utilization"):
        assert row in out, row
    results = {line.split("  ")[0]: line.split()[-1] for line in out.splitlines() if line.startswith("test ")}
    assert results == {"test test_a": "yes", "test test_b": "NO", "test test_c": "NO"}
