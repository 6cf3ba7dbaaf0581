r"""Curation stages between Clean and Tokenize: quality filters, then deduplication; the record logic is in
filters.py and dedup.py.

    docs -> Filter -> Dedup: Keys -> GroupByKey (exact key | band key) -> Pairs -> Drops (all pairs, one place)
                                   \------------------ CoGroupByKey by pack group --------------/ -> Apply
Dedup is global: every document of every file and worker meets its copies in the GroupByKey on its exact key
and on each of its LSH band keys. Confirmed pairs are joined into clusters in one place (they are few: one
per copy found); each cluster keeps its smallest id (source, position), whatever the runner or bundling.
Like every stage, each emits one tagged union (transforms.DATA / REJECT / STATS).
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from maskstream.pipeline import dedup, filters
from maskstream.pipeline.readers import QUALITY, Reject
from maskstream.pipeline.transforms import DATA, NS, REJECT, STATS, Data, Side

EXACT, BAND = b"x", b"b"      # key prefixes: an exact key's group, a band bucket


def documents(docs) -> dict:
    """A pack group's Docs -> {position: (whole text, [its parts])}; an oversized document's parts rejoined."""
    by_position: dict = {}
    for d in sorted(docs, key=lambda d: (d.position, d.part)):
        by_position.setdefault(d.position, []).append(d)
    return {pos: ("".join(d.text for d in parts), parts) for pos, parts in by_position.items()}


# ---- Filter ------------------------------------------------------------------------------------------------

def filter_group(element, config: filters.FilterConfig):
    """One pack group -> DATA (key, passing docs), REJECT per failing document (its rule), STATS per rule."""
    (source, group), docs = element
    kept, counts = [], {}
    for position, (text, parts) in documents(docs).items():
        failed = filters.check(text, config)
        if failed is None:
            kept += parts
            continue
        rule, detail = failed
        counts[f"{QUALITY}_{rule}"] = counts.get(f"{QUALITY}_{rule}", 0) + 1
        Metrics.counter(NS, f"rejected_{QUALITY}_{rule}").inc()     # for runners' UIs; index.json counts STATS
        yield REJECT, Reject(source, position, QUALITY, f"{rule}: {detail}")
    if kept:
        yield DATA, ((source, group), kept)
    if counts:
        yield STATS, counts


class Filter(beam.PTransform):
    """((source, group), [Doc]) -> documents passing every quality rule; REJECT (reason quality) the others."""
    def __init__(self, config: filters.FilterConfig):
        super().__init__()
        self.config = config

    def expand(self, docs):
        return docs | "Check" >> beam.FlatMap(filter_group, self.config)


# ---- Dedup -------------------------------------------------------------------------------------------------

class _Keys(beam.DoFn):
    """Each document -> (exact key, member) and, for minhash, (band key, member) per band.
    A member is (id, exact key, signature bytes); id = (source, position, group): ordered by source and position.
    NOTE: the signature travels as bytes: a numpy array would be pickled by Beam's fallback coder, 14 times."""
    def __init__(self, config: dedup.DedupConfig):
        self.config = config

    def setup(self):
        minhash = self.config.mode == "minhash"
        self.perms = dedup.Permutations.of(self.config.bands * self.config.rows) if minhash else None

    def process(self, element):
        (source, group), docs = element
        for position, (text, _) in documents(docs).items():
            doc_id = (source, position, group)
            key, sig = dedup.document_keys(text, self.config, self.perms)
            yield EXACT + key, (doc_id, key, None)
            if sig is not None:
                for band in dedup.band_keys(sig, self.config.bands, self.config.rows):
                    yield BAND + band, (doc_id, key, sig.tobytes())


def pairs_of(element, threshold: float):
    """One exact-key group or band bucket -> its confirmed ((id, key), (id, key)) pairs."""
    key, members = element
    members = list(members)
    if len(members) < 2:
        return
    if key.startswith(EXACT):
        found = dedup.exact_pairs([m[0] for m in members])
        yield from (((a, members[0][1]), (b, members[0][1])) for a, b in found)
    else:
        keys = {m[0]: m[1] for m in members}
        yield from (((a, keys[a]), (b, keys[b])) for a, b in dedup.bucket_pairs(members, threshold))


def drops_of(pairs):
    """Every confirmed pair -> ((source, group), (position, reason, kept id)) per dropped document."""
    keys = {doc: key for pair in pairs for doc, key in pair}
    for (source, position, group), (reason, kept) in dedup.drops([(a, b) for (a, _), (b, _) in pairs], keys).items():
        yield (source, group), (position, reason, kept)


def apply_drops(element):
    """A pack group's docs and its drops -> DATA (key, kept docs) and a REJECT per dropped document."""
    (source, group), joined = element
    dropped = {position: (reason, kept) for position, reason, kept in joined["drops"]}
    for docs in joined["docs"]:
        kept_docs = [d for d in docs if d.position not in dropped]
        if kept_docs:
            yield DATA, ((source, group), kept_docs)
    for position, (reason, (kept_source, kept_position, _)) in sorted(dropped.items()):
        Metrics.counter(NS, f"rejected_{reason}").inc()
        yield REJECT, Reject(source, position, reason, f"kept {kept_source}:{kept_position}")


class Dedup(beam.PTransform):
    """((source, group), [Doc]) -> the documents left once exact (and near) copies are dropped; REJECT each
    dropped one (duplicate | near_duplicate) with the id of the copy kept."""
    def __init__(self, config: dedup.DedupConfig):
        super().__init__()
        self.config = config

    def expand(self, docs):
        drops = (docs
                 | "Keys" >> beam.ParDo(_Keys(self.config))
                 | "GroupByKey" >> beam.GroupByKey()
                 | "Pairs" >> beam.FlatMap(pairs_of, self.config.threshold)
                 | "AllPairs" >> beam.CombineGlobally(beam.combiners.ToListCombineFn()).without_defaults()
                 | "Drops" >> beam.FlatMap(drops_of))
        return ({"docs": docs, "drops": drops}
                | "Join" >> beam.CoGroupByKey()
                | "Apply" >> beam.FlatMap(apply_drops))


def curate(docs, config):
    """DATA docs -> (curated docs, [side PCollections for WriteIndex]): Filter, then Dedup, when configured."""
    sides = []
    if config.filters.rules:
        filtered = docs | "Filter" >> Filter(config.filters)
        docs, sides = filtered | "Filtered" >> Data(), sides + [filtered | "FilterRejects" >> Side()]
    if config.dedup.mode != "none":
        deduped = docs | "Dedup" >> Dedup(config.dedup)
        docs, sides = deduped | "Deduped" >> Data(), sides + [deduped | "DedupRejects" >> Side()]
    return docs, sides
