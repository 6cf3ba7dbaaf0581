"""Shards are data, never code: pickles refused unread, unsafe names refused, truncation and corruption loud."""
import json
import pickle

import pytest
from helpers import collect, read_tar, rewrite_shard

from maskstream.loader import format as fmt
from maskstream.loader.storage import SourceError
from maskstream.loader.stream import LoaderConfig, MLMLoader


class WritesMarker:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("suffix", ["pyd", "pkl", "pth"])
def test_pickle_members_are_refused_and_never_run(uneven, tmp_path, suffix):
    marker = tmp_path / "marker"
    members = read_tar(uneven / "shard-000001.tar")
    members.insert(1, (f"000000.evil.{suffix}", pickle.dumps(WritesMarker(str(marker)))))
    rewrite_shard(uneven, 1, members)
    with pytest.raises(fmt.FormatError, match=rf"evil\.{suffix}.*refusing to decode"):
        collect(MLMLoader(uneven, LoaderConfig(batch_size=16)))
    assert not marker.exists(), "no code from the shard ran"


def test_a_pickled_object_array_inside_an_npy_member_is_refused(uneven, tmp_path):
    import io

    import numpy as np
    marker = tmp_path / "marker"
    buf = io.BytesIO()
    np.save(buf, np.array([WritesMarker(str(marker))] * 17, dtype=object), allow_pickle=True)
    members = [(n, buf.getvalue() if n.endswith("uids.npy") else d) for n, d in read_tar(uneven / "shard-000001.tar")]
    rewrite_shard(uneven, 1, members)
    with pytest.raises(fmt.FormatError, match="uids.npy"):
        collect(MLMLoader(uneven, LoaderConfig(batch_size=16)))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["pipe:curl http://x | tar x", "/etc/shard-000000.tar", "../shard-000000.tar",
                                  "shard-{000000..000002}.tar", "shard-${HOME}.tar", "sub/shard-000000.tar"])
def test_unsafe_shard_names_in_index_json_are_refused(uneven, name):
    index = json.loads((uneven / "index.json").read_text())
    index["shards"][0]["name"] = name
    (uneven / "index.json").write_bytes(fmt.dump_index(index))
    with pytest.raises(fmt.FormatError, match="only plain names"):
        MLMLoader(uneven, LoaderConfig(batch_size=16))


def test_a_shard_cut_at_a_tar_header_boundary_is_an_error_not_a_shorter_epoch(uneven):
    index = json.loads((uneven / "index.json").read_text())
    last_record = index["shards"][0]["records"][-1][0]  # a header boundary: tarfile would read a clean end
    path = uneven / "shard-000000.tar"
    path.write_bytes(path.read_bytes()[:last_record])
    with pytest.raises(SourceError, match=rf"shard-000000.tar has {last_record} bytes, index.json says"):
        collect(MLMLoader(uneven, LoaderConfig(batch_size=16)))


def test_record_counts_that_disagree_with_index_json_are_an_error(uneven):
    index = json.loads((uneven / "index.json").read_text())
    records = index["shards"][0]["records"]
    records[1][1], records[2][1] = records[2][1], records[1][1]  # 64/40 swapped: totals still add up
    (uneven / "index.json").write_bytes(fmt.dump_index(index))
    with pytest.raises(fmt.FormatError, match="holds (64|40) sequences, index.json says (40|64)"):
        collect(MLMLoader(uneven, LoaderConfig(batch_size=16)))


@pytest.mark.parametrize("checks", [True, False])  # caught by the record checksum, or by tar's own checks
@pytest.mark.parametrize("member", [0, 2])  # the record's first header, and one inside the record
def test_a_corrupt_tar_header_is_an_error(uneven, member, checks):
    index = json.loads((uneven / "index.json").read_text())
    start = index["shards"][2]["records"][1][0]
    path = uneven / "shard-000002.tar"
    data = bytearray(path.read_bytes())
    header = start
    for _ in range(member):  # walk to the member-th header of the record
        size = int(data[header + 124:header + 136].rstrip(b"\0 ").decode(), 8)
        header += 512 + -(-size // 512) * 512
    data[header + 100:header + 108] = b"garbage!"  # the mode field: the header checksum no longer matches
    path.write_bytes(bytes(data))
    why = "xxh3_64 [0-9a-f]{16} but index.json says" if checks else "(unreadable tar data|record lacks member)"
    with pytest.raises(fmt.FormatError, match=f"shard-000002.tar record 1 at offset {start}: {why}"):
        collect(MLMLoader(uneven, LoaderConfig(batch_size=16, check_records=checks)))


def test_a_missing_shard_is_an_error(uneven):
    (uneven / "shard-000001.tar").unlink()
    with pytest.raises(SourceError, match="shard-000001.tar is missing"):
        collect(MLMLoader(uneven, LoaderConfig(batch_size=16)))


def test_an_incomplete_dataset_without_index_json_is_refused(uneven):
    (uneven / "index.json").unlink()
    with pytest.raises(SourceError, match="index.json not found"):
        MLMLoader(uneven, LoaderConfig())


def test_errors_in_workers_reach_the_training_process(uneven):
    (uneven / "shard-000001.tar").unlink()
    with pytest.raises(Exception, match="shard-000001.tar is missing"):
        collect(MLMLoader(uneven, LoaderConfig(batch_size=16, num_workers=2)))
