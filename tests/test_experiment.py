"""`maskstream experiment`'s static twin re-runs the Beam job from what index.json records, from any folder."""
import json
import shutil
from pathlib import Path

import pytest

from maskstream.pipeline import run as pipeline_run
from maskstream.workflows.experiment import static_twin

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_static_twin_of_a_dataset_made_elsewhere_has_the_same_sequences(tmp_path, monkeypatch):
    made = tmp_path / "made"
    (made / "corpus").mkdir(parents=True)
    shutil.copyfile(ROOT / "tests" / "golden" / "sotu-6.jsonl", made / "corpus" / "sotu-6.jsonl")
    shutil.copyfile(ROOT / "data" / "tokenizers" / "bert-base-uncased.json", made / "bert.json")
    monkeypatch.chdir(made)   # relative paths, as a user types them
    pipeline_run.run(["--input", "corpus/sotu-6.jsonl", "--tokenizer", "bert.json", "--output", "dynamic",
                      "--num-shards", "3", "--seq-len", "64", "--quiet"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    twin = static_twin(made / "dynamic", Path("twin"), copies=2)
    dynamic = json.loads((made / "dynamic" / "index.json").read_text())
    static = json.loads((twin / "index.json").read_text())
    assert static["masking"]["mode"] == "static"
    assert static["counts"]["sequences"] == dynamic["counts"]["sequences"] > 0
    assert static["counts"]["tokens"] == dynamic["counts"]["tokens"]
    assert [i["key"] for i in static["inputs"]] == ["sotu-6.jsonl"]
