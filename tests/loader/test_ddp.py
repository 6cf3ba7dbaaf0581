"""Two real processes, gloo, a DDP model, deliberately uneven shards: equal steps, disjoint data, no hang."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import build_dataset, free_port

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_process_ddp_over_uneven_shards_takes_equal_steps_without_hanging(tmp_path, data_dir):
    # 3 shards of 200, 17 and 5 sequences: per-shard splitting would give the ranks very different counts
    root = build_dataset(tmp_path / "ds", [[64, 64, 64, 8], [17], [5]])
    out, port = tmp_path / "result", free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "ddp_worker.py"), str(r), "2", str(root), str(port),
                               str(out)], cwd=HERE.parents[1], env={**os.environ, "PYTHONPATH": str(HERE.parents[1])})
             for r in range(2)]
    try:
        codes = [p.wait(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0]
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert results[0]["steps"] == results[1]["steps"] == 2 * (222 // 32)
    assert all(r["epoch"] == 2 for r in results)
    for epoch in range(2):
        per_rank = [{u for b in r["uids"][epoch * 6:(epoch + 1) * 6] for u in b} for r in results]
        assert len(per_rank[0]) == len(per_rank[1]) == 96 and not per_rank[0] & per_rank[1]
    assert results[0]["stats"]["dropped"] == 222 - 192

