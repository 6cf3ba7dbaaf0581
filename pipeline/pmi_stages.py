"""The Beam stages of PMI masking units: whole-corpus n-gram counts -> the n-gram vocabulary (one dict).

    tokdocs -> CountInGroup -> ByBucket -> SumCounts (CombinePerKey) -> Frequent -> Gather -----> Select
       |                                                      (frequent hashes) \\ side input    ^   ^
       +-> FindWords (side input: frequent hashes) -> GatherWords --------------------------------+   |
       +-> CountPositions -> SumPositions ---------------------------------------------------------+

The record logic is pipeline/pmi.py. n-grams are counted as uint64 hashes in numpy arrays, one element per
pack group and bucket (never one per n-gram); counts are exact integer sums, the words of a hash are the same
wherever found, and Select sorts what it scores, so the vocabulary does not depend on bundles or workers.
transforms.build hands it to Pack (unit starts) and to WriteIndex (the file beside index.json).
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from maskstream.pipeline import pmi

BUCKETS = 16   # the n-gram counts are summed in this many parts (by the hash's top bits), on as many workers


class _Sum(beam.CombineFn):
    """Values -> their sum by `add` (pmi.merge_counts, or summing dicts); inputs buffered, merged in batches."""
    def __init__(self, add, empty):
        self.add, self.empty = add, empty

    def create_accumulator(self):
        return []

    def add_input(self, acc, element):
        acc.append(element)
        return [self.add(acc)] if len(acc) >= 32 else acc

    def merge_accumulators(self, accs):
        return [self.add([x for acc in accs for x in acc])]

    def extract_output(self, acc):
        return self.add(acc) if acc else self.empty()


def _sum_positions(dicts) -> dict:
    total = {}
    for d in dicts:
        for n, count in d.items():
            total[n] = total.get(n, 0) + count
    return total


def _first_words(dicts) -> dict:
    """{hash: words}: the words of each hash; the smallest should two n-grams share a hash (any order, same result)."""
    out = {}
    for d in dicts:
        for h, words in d.items():
            out[h] = min(out[h], words) if h in out else words
    return out


def _buckets(counted):
    hashes, counts = counted
    bucket = (hashes >> np.uint64(60)).astype(np.int64)   # 16 buckets
    for b in np.unique(bucket).tolist():
        yield b, (hashes[bucket == b], counts[bucket == b])


def _frequent(counted, min_count):
    hashes, counts = counted
    return hashes[counts >= min_count], counts[counts >= min_count]


def _select(frequent, ngrams, positions, config):
    return pmi.select_vocabulary(*frequent, ngrams, positions, config)


def _empty_counts():
    return np.zeros(0, np.uint64), np.zeros(0, np.int64)


class FindUnits(beam.PTransform):
    """((source, group), [TokDoc]) -> the PMI n-gram vocabulary of the whole corpus (pmi.select_vocabulary)."""
    def __init__(self, config: pmi.PmiConfig):
        super().__init__()
        self.config = config

    def expand(self, tokdocs):
        cfg = self.config
        frequent = (tokdocs
                    | "CountInGroup" >> beam.Map(lambda element: pmi.count_group(element[1], cfg.max_n))
                    | "ByBucket" >> beam.FlatMap(_buckets)
                    | "SumCounts" >> beam.CombinePerKey(_Sum(pmi.merge_counts, _empty_counts))
                    | "Frequent" >> beam.Map(lambda kv: _frequent(kv[1], cfg.min_count))
                    | "Gather" >> beam.CombineGlobally(_Sum(pmi.merge_counts, _empty_counts)))
        ngrams = (tokdocs
                  | "FindWords" >> beam.Map(lambda element, f: pmi.ngrams_of(element[1], f[0], cfg.max_n),
                                            beam.pvalue.AsSingleton(frequent))
                  | "GatherWords" >> beam.CombineGlobally(_Sum(_first_words, dict)))
        positions = (tokdocs
                     | "CountPositions" >> beam.Map(lambda element: pmi.count_positions(element[1], cfg.max_n))
                     | "SumPositions" >> beam.CombineGlobally(_Sum(_sum_positions, dict)))
        return frequent | "Select" >> beam.Map(_select, beam.pvalue.AsSingleton(ngrams),
                                               beam.pvalue.AsSingleton(positions), cfg)
