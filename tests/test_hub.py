"""A model named by a hub id: a cached copy loads without the network, a miss is one line naming the id and
how to point at a local copy (no retry screens, no blame on a missing model_index.json)."""
from __future__ import annotations

import pytest

from agentlit.hub import HubMissError, from_pretrained


def _loader(calls: list):
    def load(name_or_path, **kwargs):
        calls.append((name_or_path, kwargs))
        return "pipeline"

    return load


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_offline_miss_is_one_line_naming_the_id_and_a_local_copy(empty_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    with pytest.raises(HubMissError) as err:
        from_pretrained(_loader(calls), "someone/missing-model", "--model.pretrained_model_name_or_path")
    assert not calls  # nothing was tried: no retries
    assert str(err.value) == (
        "--model.pretrained_model_name_or_path someone/missing-model: not in the local hub cache and the hub is off "
        "(HF_HUB_OFFLINE=1); download it where the hub is reachable (huggingface-cli download someone/missing-model "
        "--local-dir DIR) and pass --model.pretrained_model_name_or_path DIR, or fill the cache "
        f"({empty_cache}) there and copy it here")


def test_unreachable_hub_is_one_line_too(empty_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def load(name_or_path, **kwargs):
        raise OSError("someone/missing-model does not appear to have a file named model_index.json.")

    with pytest.raises(HubMissError, match=r"^--model.pipeline someone/missing-model: not in the local hub cache and "
                                           r"could not be fetched \(.*model_index.json.\); download it"):
        from_pretrained(load, "someone/missing-model", "--model.pipeline")


def test_local_folder_and_cached_id_load_without_the_network(empty_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    folder = tmp_path / "my-pipeline"
    folder.mkdir()
    assert from_pretrained(_loader(calls), str(folder), "--model.pipeline", torch_dtype="fp32") == "pipeline"
    assert calls[-1] == (str(folder), {"torch_dtype": "fp32"})
    snapshot = empty_cache / "models--someone--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (empty_cache / "models--someone--cached" / "refs").mkdir()
    (empty_cache / "models--someone--cached" / "refs" / "main").write_text("abc123")
    from_pretrained(_loader(calls), "someone/cached", "--model.pipeline")
    assert calls[-1] == ("someone/cached", {"local_files_only": True})


def test_neither_a_folder_nor_a_hub_id(empty_cache):
    with pytest.raises(HubMissError, match=r"--model.pipeline no/such/folder: no such folder, and not a hub model id"):
        from_pretrained(_loader([]), "no/such/folder", "--model.pipeline")


def test_the_cli_prints_the_miss_as_one_line(tmp_path):
    from cli_helpers import ROOT, assert_one_line_error, run_main

    code, out, err = run_main("predict", "--config", str(ROOT / "configs" / "generation" / "quickstart.yaml"),
                              "--model.pretrained_model_name_or_path", "someone/not-here", cwd=tmp_path)
    assert_one_line_error(code, err, r"--model.pretrained_model_name_or_path someone/not-here: not in the local hub "
                                     r"cache and the hub is off \(HF_HUB_OFFLINE=1\); download it")
    assert not (tmp_path / "outputs").exists()
