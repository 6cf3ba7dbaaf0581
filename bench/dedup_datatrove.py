"""datatrove's MinHash dedup on a JSONL corpus, for bench/bench_dedup.py: runs in the peers bench env
(.venv-peers, `make bench-peers`; datatrove pinned in bench/requirements-peers.txt), imports no maskstream.

    python bench/dedup_datatrove.py CORPUS.jsonl WORKDIR      # prints the removed documents' ids as JSON

Its four stages as its README runs them (signatures -> buckets -> clusters -> filter), one worker, with its
defaults (word 5-grams, 14 buckets x 8 hashes, 64-bit xxhash). Words are split by its WhitespaceTokenizer (which
splits with spaCy's language-neutral "xx" tokenizer; English's full spaCy pipeline would be slower).
Needs, beside datatrove 0.9.0: spacy, orjson, regex, tokenizers, xxhash<4 (4.x refuses the str it passes).
"""
import json
import shutil
import sys
from pathlib import Path


def main(corpus: str, workdir: str) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WhitespaceTokenizer
    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    data = work / "input"
    data.mkdir(parents=True)
    shutil.copy(corpus, data / "corpus.jsonl")
    config = MinhashConfig(hash_config=HashConfig(precision=64))
    read = lambda: JsonlReader(str(data), id_key="id")  # noqa: E731
    stages = [
        [read(), MinhashDedupSignature(output_folder=str(work / "signatures"), config=config,
                                       language=WhitespaceTokenizer())],
        [MinhashDedupBuckets(input_folder=str(work / "signatures"), output_folder=str(work / "buckets"),
                             config=config)],
        [MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=config)],
        [read(), MinhashDedupFilter(input_folder=str(work / "remove"),
                                    exclusion_writer=JsonlWriter(str(work / "removed"), compression=None)),
         JsonlWriter(str(work / "output"), compression=None)],
    ]
    tasks = [1, config.num_buckets, 1, 1]
    for i, (pipeline, n) in enumerate(zip(stages, tasks, strict=True)):
        LocalPipelineExecutor(pipeline=pipeline, tasks=n, workers=1, logging_dir=str(work / f"logs{i}")).run()
    removed = [json.loads(line)["id"] for f in sorted((work / "removed").glob("*.jsonl")) for line in open(f)]
    print(json.dumps(sorted(int(i) for i in removed)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
