"""maskstream preprocess on a SLURM (or PBS) cluster through dask-jobqueue: workers start as batch jobs, the
job runs on them, and they are released when it ends.

    pip install 'maskstream[dask]' dask-jobqueue
    python deploy/dask/slurm.py --jobs 8 --queue normal -- --input '/shared/corpus/*.jsonl.gz' \
        --tokenizer /shared/wp30k.json --output /shared/shards/run1 --dedup minhash --num-shards 256

Inputs, tokenizer and --output must be on a filesystem every node mounts (the workers read and write them).
For PBS use dask_jobqueue.PBSCluster with the same arguments.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=4, help="SLURM jobs, one worker process per core each")
    p.add_argument("--cores", type=int, default=8, help="cores per job")
    p.add_argument("--memory", default="32GB", help="memory per job")
    p.add_argument("--queue", default=None, help="SLURM partition")
    p.add_argument("--walltime", default="02:00:00")
    p.add_argument("job_args", nargs=argparse.REMAINDER, help="-- then `maskstream preprocess` flags")
    a = p.parse_args(argv)
    from dask_jobqueue import SLURMCluster

    from maskstream.pipeline import run
    # one process per core, one thread each: a worker tokenizes with one core (TOKENIZERS_PARALLELISM=false)
    cluster = SLURMCluster(cores=a.cores, processes=a.cores, memory=a.memory, queue=a.queue, walltime=a.walltime,
                           job_script_prologue=["export TOKENIZERS_PARALLELISM=false"])
    try:
        cluster.scale(jobs=a.jobs)
        job_args = [x for x in a.job_args if x != "--"]
        run.run([*job_args, "--runner=DaskRunner", f"--dask_client_address={cluster.scheduler_address}"])
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
