"""sc_c2s.models: the registry, downloads through pooch from a server on 127.0.0.1, and loading."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import sc_c2s
from sc_c2s import models
from sc_c2s.models import C2SMetadata, C2SModel, _download, _files, _load, _registry, _runtime
from sc_c2s.models._metadata import TASKS
from sc_c2s.models._scratch import build_model, build_tokenizer

from .conftest import registry_entry

GENES = [f"GENE{i}" for i in range(40)]
LABELS = ["T cell", "B cell"]
PUBLISHED = [
    "C2S-Pythia-410m-cell-type-prediction",
    "C2S-Pythia-410m-cell-type-conditioned-cell-generation",
    "C2S-Pythia-410m-diverse-single-and-multi-cell-tasks",
    "pythia-160m-c2s",
    "C2S-Scale-Pythia-1b-pt",
    "C2S-Scale-Gemma-2-2B",
    "C2S-Scale-Gemma-2-27B",
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-NeoX and its word-level tokenizer, saved whole ("tiny") and in weight shards ("tiny-sharded")."""
    tokenizer = build_tokenizer(GENES, LABELS, max_genes=20)
    model = build_model(tokenizer, hidden_size=16, n_layers=1, n_heads=2)
    paths = {"tiny": tmp_path_factory.mktemp("tiny"), "tiny-sharded": tmp_path_factory.mktemp("tiny-sharded")}
    model.save_pretrained(paths["tiny"])
    model.save_pretrained(paths["tiny-sharded"], max_shard_size="20KB")
    for path in paths.values():
        tokenizer.save_pretrained(path)
    assert len(list(paths["tiny-sharded"].glob("model-*-of-*.safetensors"))) > 1
    return paths


@pytest.fixture
def hub(checkpoints, checkpoint_server, publish):
    """The tiny checkpoints in the registry, served like Hugging Face (and flat under /flat/) on 127.0.0.1."""
    for name, source in checkpoints.items():
        publish(name, source)
    shutil.copytree(checkpoints["tiny"], checkpoint_server.root / "flat")
    return checkpoint_server


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_available_lists_published_checkpoints_and_demo():
    zoo = models.available()
    assert list(zoo.index) == [*PUBLISHED, "demo"]
    assert zoo.loc["C2S-Scale-Gemma-2-27B", "revision"] == "44c2ff7dd5edc26daf9c3f4106e18e162a55676a"
    published = zoo.loc[PUBLISHED]
    assert all(r == "main" or re.fullmatch(r"[0-9a-f]{40}", r) for r in published["revision"])
    assert (published["repo"] == "vandijklab/" + published.index).all()
    assert set(published["architecture"]) == {"GPTNeoXForCausalLM", "Gemma2ForCausalLM"}
    assert all(set(tasks) <= set(TASKS) and tasks for tasks in published["tasks"])
    assert zoo.loc["pythia-160m-c2s", "prompt_style"] == "c2s-legacy"
    assert zoo.loc["C2S-Pythia-410m-cell-type-prediction", "tasks"] == ("cell_type_prediction",)
    assert "config.json" in zoo.loc["C2S-Scale-Gemma-2-2B", "files"]
    fields = {f.name for f in dataclasses.fields(_registry.RegistryEntry)}
    assert all(set(unconfirmed) <= fields for unconfirmed in zoo["unconfirmed"])


def test_fetch_downloads_into_the_cache_then_reuses_it(hub, checkpoints, cache):
    source = checkpoints["tiny"]
    path = models.fetch("tiny", progressbar=False)
    assert path == cache / "test" / "tiny" / "rev1"
    assert sorted(p.name for p in path.iterdir()) == sorted([*os.listdir(source), _download.HASHES_FILE])
    assert all((path / p.name).read_bytes() == p.read_bytes() for p in source.iterdir())
    assert _download.recorded_hashes(path) == {p.name: sha256(p) for p in source.iterdir()}
    assert hub.requests == Counter({f"/test/tiny/resolve/rev1/{p.name}": 1 for p in source.iterdir()})

    assert models.fetch("test/tiny", progressbar=False) == path  # by repository, from the cache
    assert sum(hub.requests.values()) == len(os.listdir(source))


def test_fetch_reads_the_shards_from_the_index(hub, checkpoints):
    source = checkpoints["tiny-sharded"]
    path = models.fetch("tiny-sharded", progressbar=False)
    assert sorted(p.name for p in path.iterdir()) == sorted([*os.listdir(source), _download.HASHES_FILE])
    assert set(_download.recorded_hashes(path)) == set(os.listdir(source))


def test_known_hash_mismatch_is_an_error(hub, checkpoints, cache, monkeypatch):
    config = checkpoints["tiny"] / "config.json"
    entry = _registry.REGISTRY["tiny"]
    monkeypatch.setitem(_registry.REGISTRY, "tiny", dataclasses.replace(entry, sha256={"config.json": "0" * 64}))
    with pytest.raises(ValueError, match="config.json") as error:
        models.fetch("tiny", progressbar=False)
    assert "0" * 64 in str(error.value)
    assert sha256(config) in str(error.value)
    assert not (cache / "test" / "tiny" / "rev1" / "config.json").exists()
    assert hub.requests["/test/tiny/resolve/rev1/config.json"] == 1 + _download.RETRIES

    monkeypatch.setitem(_registry.REGISTRY, "tiny", dataclasses.replace(entry, sha256={"config.json": sha256(config)}))
    path = models.fetch("tiny", progressbar=False)
    assert (path / "config.json").read_bytes() == config.read_bytes()
    assert _download.recorded_hashes(path) == {p.name: sha256(p) for p in checkpoints["tiny"].iterdir()}


def test_a_file_the_server_changed_is_discarded_with_what_to_do(hub, cache):
    """A revision moved upstream: the error's advice (`rm` the file, fetch again) downloaded the new file, which
    failed against the hash of the first download and stayed in the cache: every later call failed alike."""
    path = models.fetch("tiny", progressbar=False)
    (path / "tokenizer_config.json").unlink()
    served = hub.root / "test" / "tiny" / "resolve" / "rev1" / "tokenizer_config.json"
    served.write_text(served.read_text().replace("}", ', "changed": true}', 1))
    with pytest.raises(ValueError, match=r"differs from the file first downloaded here .* `rm -r '") as error:
        models.fetch("tiny", progressbar=False)
    assert "The download was discarded" in str(error.value)
    assert not (path / "tokenizer_config.json").exists()
    shutil.rmtree(path)  # the advice
    assert (models.fetch("tiny", progressbar=False) / "tokenizer_config.json").read_bytes() == served.read_bytes()


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), r"is truncated: it has \d+ bytes"),
        (lambda p: p.write_text("<html>Rate limited</html>"), r"is truncated: .* header alone says"),
    ],
    ids=["truncated", "error page"],
)
def test_a_damaged_download_is_discarded(hub, cache, damage, match):
    """Served without a Content-Length, or as a mirror's error page: accepted, and its hash recorded as trusted."""
    damage(hub.root / "test" / "tiny" / "resolve" / "rev1" / "model.safetensors")
    with pytest.raises(ValueError, match=rf"model\.safetensors downloaded from .* {match}.*The download was discarded"):
        models.fetch("tiny", progressbar=False)
    path = cache / "test" / "tiny" / "rev1"
    assert not (path / "model.safetensors").exists()
    assert "model.safetensors" not in _download.recorded_hashes(path)


@pytest.mark.parametrize(
    ("index", "match"),
    [
        ("<html>Rate limited</html>", r"model\.safetensors\.index\.json downloaded from .* is not valid JSON"),
        ('{"weight_map": {"w": "../../../../escaped.safetensors"}}', r"names weight files outside its folder"),
        ('{"metadata": {}}', r"is not the index of a sharded checkpoint"),
    ],
    ids=["error page", "outside the cache", "no weight map"],
)
def test_a_bad_shard_index_is_refused(hub, cache, index, match):
    """A mirror's error page gave a bare JSONDecodeError, also offline; a shard named `../…` was written outside."""
    (hub.root / "test" / "tiny-sharded" / "resolve" / "rev1" / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=match):
        models.fetch("tiny-sharded", progressbar=False)
    assert not list(cache.parent.glob("**/escaped.safetensors"))


def test_damaged_recorded_hashes_are_named(hub):
    """A `sha256.json` damaged from outside made every fetch and load fail with a bare JSONDecodeError."""
    path = models.fetch("tiny", progressbar=False)
    (path / _download.HASHES_FILE).write_text("{")
    with pytest.raises(models.BrokenCheckpointError, match=r"sha256\.json, the hashes of the files .* `rm '"):
        models.load("tiny", device="cpu")
    (path / _download.HASHES_FILE).unlink()  # the advice
    files = {p.name: sha256(p) for p in path.iterdir()}
    assert models.load("tiny", device="cpu").sha256 == files


def test_merge_of_a_whole_model_is_announced(checkpoints, scanpy_log):
    """`merge=True` is for adapters: on a whole model it was ignored without a word."""
    models.load(checkpoints["tiny"], device="cpu", merge=True)
    assert "`merge=True` folds a LoRA adapter into its base;" in scanpy_log.getvalue()


def test_an_adapter_of_the_demo_finds_the_demo_of_this_installation():
    """Trained in another environment, it named a demo folder that is not here, and could not be opened."""
    base = {"model": "demo", "path": "/elsewhere/site-packages/sc_c2s/models/demo", "revision": None, "sha256": {}}
    assert _load._base_source(base, Path("adapter")) == "demo"


def test_a_relative_cache_gives_absolute_paths(hub, tmp_path, monkeypatch):
    """`SC_C2S_CACHE=relcache` gave a model whose path and provenance were relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(_download.CACHE_ENV, "relcache")
    model = models.load("tiny", device="cpu")
    assert model.path == tmp_path / "relcache" / "test" / "tiny" / "rev1"
    assert Path(model.provenance()["path"]).is_absolute()


def test_file_changed_since_first_download_is_an_error(hub, checkpoints):
    path = models.fetch("tiny", progressbar=False)
    changed = path / "tokenizer.json"
    recorded = _download.recorded_hashes(path)["tokenizer.json"]
    with changed.open("a") as f:
        f.write(" ")
    n_requests = sum(hub.requests.values())
    for call in (lambda: models.fetch("tiny", progressbar=False), lambda: models.load("tiny")):
        with pytest.raises(ValueError, match="Delete it and fetch it again") as error:
            call()
        assert str(changed) in str(error.value)
        assert f"expected {recorded}, got {sha256(changed)}" in str(error.value)
    assert sum(hub.requests.values()) == n_requests

    changed.unlink()
    models.fetch("tiny", progressbar=False)
    assert changed.read_bytes() == (checkpoints["tiny"] / "tokenizer.json").read_bytes()
    assert hub.requests["/test/tiny/resolve/rev1/tokenizer.json"] == 2


def test_interrupted_download_leaves_no_complete_looking_file(hub, checkpoints, cache):
    source = sorted(os.listdir(checkpoints["tiny"]))
    hub.drop["model.safetensors"] = 1 + _download.RETRIES
    with pytest.raises(ConnectionError, match="model.safetensors"):
        models.fetch("tiny", progressbar=False)
    assert hub.requests["/test/tiny/resolve/rev1/model.safetensors"] == 1 + _download.RETRIES
    path = cache / "test" / "tiny" / "rev1"
    before = sorted(p.name for p in path.iterdir())
    downloaded = source[: source.index("model.safetensors")]
    assert before == sorted([*downloaded, _download.HASHES_FILE])  # no partial or temporary file
    assert sorted(_download.recorded_hashes(path)) == downloaded

    hub.requests.clear()
    models.fetch("tiny", progressbar=False)
    assert set(hub.requests) == {f"/test/tiny/resolve/rev1/{f}" for f in source if f not in downloaded}
    assert (path / "model.safetensors").read_bytes() == (checkpoints["tiny"] / "model.safetensors").read_bytes()


def test_fetches_at_once_keep_every_hash(hub, checkpoints, cache):
    """Dask workers fetch the same checkpoint at once: none fails, and none loses a hash that another recorded."""
    source = checkpoints["tiny-sharded"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: models.fetch("tiny-sharded", progressbar=False), range(8)))
    path = cache / "test" / "tiny-sharded" / "rev1"
    assert paths == [path] * 8
    assert sorted(p.name for p in path.iterdir()) == sorted([*os.listdir(source), _download.HASHES_FILE])
    assert _download.recorded_hashes(path) == {p.name: sha256(p) for p in source.iterdir()}

    # two fetches that both read the record before either wrote to it
    entry = _registry.REGISTRY["tiny"]
    first, second = (
        _download._Download(entry=entry, revision="rev1", base_url=hub.url, progressbar=False) for _ in range(2)
    )
    first.get("config.json")
    second.get("tokenizer.json")
    assert sorted(_download.recorded_hashes(first.directory)) == ["config.json", "tokenizer.json"]


def test_dropped_connection_is_retried(hub, checkpoints):
    hub.drop["model.safetensors"] = 1
    path = models.fetch("tiny", progressbar=False)
    assert hub.requests["/test/tiny/resolve/rev1/model.safetensors"] == 2
    assert (path / "model.safetensors").read_bytes() == (checkpoints["tiny"] / "model.safetensors").read_bytes()


def test_offline_error_names_files_urls_and_cache_folder(hub, cache, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv(_download.BASE_URL_ENV, closed)
    with pytest.raises(ConnectionError) as error:
        models.fetch("tiny", progressbar=False)
    message = str(error.value)
    assert str(cache / "test" / "tiny" / "rev1") in message
    for file in _registry.REGISTRY["tiny"].files:
        assert f"{closed}/test/tiny/resolve/rev1/{file}  ->  {file}" in message
    assert "shards" not in message
    assert message.endswith("set $SC_C2S_BASE_URL or pass `base_url` to `sc_c2s.models.fetch`.")
    with pytest.raises(ConnectionError, match=r"shards listed in each \*.index.json"):
        models.fetch("tiny-sharded", progressbar=False)

    # once the index is there, the missing shards are named: as after deleting a damaged one
    monkeypatch.setenv(_download.BASE_URL_ENV, hub.url)
    path = models.fetch("tiny-sharded", progressbar=False)
    shard = sorted(path.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    monkeypatch.setenv(_download.BASE_URL_ENV, closed)
    with pytest.raises(ConnectionError) as error:
        models.fetch("tiny-sharded", progressbar=False)
    assert f"{closed}/test/tiny-sharded/resolve/rev1/{shard.name}  ->  {shard.name}" in str(error.value)
    assert "shards listed" not in str(error.value)


def test_base_url_argument_overrides_the_environment(hub, checkpoints, cache, monkeypatch):
    monkeypatch.setenv(_download.BASE_URL_ENV, "http://127.0.0.1:9")  # discard port: nothing listens
    assert models.fetch("tiny", base_url=hub.url, progressbar=False) == cache / "test" / "tiny" / "rev1"

    monkeypatch.setenv(_download.CACHE_ENV, str(cache.with_name("flat-cache")))
    path = models.fetch("tiny", base_url=hub.url + "/flat/{file}", progressbar=False)
    assert {f"/flat/{f}" for f in os.listdir(checkpoints["tiny"])} <= set(hub.requests)
    assert _download.recorded_hashes(path) == {p.name: sha256(p) for p in checkpoints["tiny"].iterdir()}


def test_unknown_name_lists_available_names():
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a name") as error:
        models.load("no-such-model")
    assert all(repr(name) in str(error.value) for name in [*PUBLISHED, "demo"])
    with pytest.raises(ValueError, match="No checkpoint called 'no-such-model'. Available: 'C2S-Pythia-410m"):
        models.fetch("no-such-model")
    with pytest.raises(TypeError, match="available"):
        models.load(42)
    with pytest.raises(ValueError, match="'' is neither a checkpoint directory"):  # not the working directory
        models.load("")


def test_a_model_that_is_not_a_checkpoint_says_what_it_is(tmp_path, pbmc68k):
    """A file was "neither a checkpoint directory nor a name"; `model=None` or a transformers model named
    `name_or_path`, an argument of `load` that the caller of a verb never passed."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=r"'.*model.safetensors' is a file, not a checkpoint directory; pass the"):
        models.load(weights)
    sc_c2s.pp.to_sentences(pbmc68k, n_genes=10)
    for model in (None, build_model(build_tokenizer(["CD3D"]), hidden_size=8, n_layers=1, n_heads=2)):
        with pytest.raises(TypeError, match=r"`model` must be a model from `sc_c2s.models.load`, a name .* got a"):
            sc_c2s.tl.annotate(pbmc68k, model=model)


def test_unknown_names_list_what_the_caller_takes():
    """`fetch` used to offer 'demo', which it refuses; finetune's "scratch" was missing from the names."""
    with pytest.raises(ValueError, match=r"No checkpoint called 'dem'") as error:
        models.fetch("dem")
    available = str(error.value).split(" (")[0]
    assert all(repr(name) in available for name in PUBLISHED) and "'demo'" not in available
    assert "'demo' comes with the package, without a download: open it with `load('demo')`" in str(error.value)
    with pytest.raises(ValueError, match=r"'scrach' is neither 'scratch', a checkpoint directory nor a name") as error:
        _load.check_name_or_path("scrach", also=["scratch"])
    assert all(repr(name) in str(error.value) for name in [*PUBLISHED, "demo"])
    for name in ("scratch", "demo", PUBLISHED[0], Path(".")):
        _load.check_name_or_path(name, also=["scratch"])


def test_load_registry_checkpoint(hub, checkpoints, cache, no_gpu):
    source = checkpoints["tiny"]
    model = models.load("tiny")
    assert isinstance(model, C2SModel)
    assert model.metadata == _registry.REGISTRY["tiny"].metadata()
    assert model.metadata.name == "tiny"
    assert model.metadata.n_genes == 20
    assert model.metadata.tasks == ["cell_type_prediction"]
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.float32)
    assert not model.model.training
    assert model.tokenizer.padding_side == "left"
    assert model.tokenizer.pad_token == "[PAD]"
    reference = AutoModelForCausalLM.from_pretrained(source).state_dict()
    assert model.model.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in model.model.state_dict().items())
    path = cache / "test" / "tiny" / "rev1"
    assert model.provenance() == {
        "model": "tiny",
        "path": str(path),
        "sha256": {p.name: sha256(p) for p in source.iterdir()},
        "revision": "rev1",
    }


def test_load_finetuned_directory_reads_its_metadata(checkpoints, tmp_path):
    path = tmp_path / "finetuned"
    shutil.copytree(checkpoints["tiny"], path)
    metadata = C2SMetadata(
        name="finetuned-test",
        organism="Mus musculus",
        n_genes=20,
        vocabulary=GENES,
        labels=LABELS,
        training={"epochs": 1},
        scores={"accuracy": 0.5},
    )
    metadata.write(path)
    model = models.load(path, device="cpu", dtype="bfloat16")
    assert model.metadata == metadata
    assert model.dtype == torch.bfloat16
    assert model.provenance() == {
        "model": "finetuned-test",
        "path": str(path),
        "sha256": {p.name: sha256(p) for p in path.iterdir()},
    }
    with pytest.raises(ValueError, match="`revision` selects a revision of a registry checkpoint"):
        models.load(path, revision="main")


def test_a_relative_path_is_kept_absolute(checkpoints, tmp_path, monkeypatch):
    """A model loaded from a relative path was recorded (and sent to Dask workers) as that relative path."""
    shutil.copytree(checkpoints["tiny"], tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    model = models.load("model", device="cpu")
    assert model.path == tmp_path / "model"
    assert model.provenance()["path"] == str(tmp_path / "model")


def test_load_published_layout_takes_registry_metadata(checkpoints, tmp_path, scanpy_log):
    name = "C2S-Pythia-410m-cell-type-prediction"
    hf_cache = tmp_path / f"models--vandijklab--{name}" / "snapshots" / "0123abc"
    shutil.copytree(checkpoints["tiny"], hf_cache)
    model = models.load(hf_cache, device="cpu")
    assert model.metadata == _registry.REGISTRY[name].metadata()
    assert model.metadata.tasks == ["cell_type_prediction"]
    assert model.revision is None
    assert "no c2s_metadata.json" not in scanpy_log.getvalue()

    cached = tmp_path / "cache" / _registry.REGISTRY[name].repo / "0123abc"  # the layout of `fetch`
    shutil.copytree(checkpoints["tiny"], cached)
    assert models.load(cached, device="cpu").metadata == _registry.REGISTRY[name].metadata()

    unrelated = tmp_path / "unrelated"
    shutil.copytree(checkpoints["tiny"], unrelated)
    assert models.load(str(unrelated), device="cpu").metadata == C2SMetadata(name="unrelated", answer_prefix=None)
    assert f"{unrelated} has no c2s_metadata.json" in scanpy_log.getvalue()
    # a run saved inside a published checkpoint's folder is not that checkpoint
    inside = tmp_path / name / "my_run" / "checkpoint-500"
    shutil.copytree(checkpoints["tiny"], inside)
    assert models.load(inside, device="cpu").metadata == C2SMetadata(name="checkpoint-500", answer_prefix=None)


def test_load_demo_from_the_bundled_directory(checkpoints, tmp_path, monkeypatch):
    missing = tmp_path / "missing"
    monkeypatch.setattr(_registry, "demo_dir", lambda: missing)
    with pytest.raises(FileNotFoundError, match=f"expected at {missing}"):
        models.load("demo")
    assert models.available().loc["demo", "files"] == ()

    demo = tmp_path / "demo"
    shutil.copytree(checkpoints["tiny"], demo)
    C2SMetadata(n_genes=20, labels=LABELS).write(demo)
    monkeypatch.setattr(_registry, "demo_dir", lambda: demo)
    model = models.load("demo", device="cpu")
    assert (model.name, model.path, model.revision) == ("demo", demo, None)
    assert model.metadata.labels == LABELS
    row = models.available().loc["demo"]
    assert row["files"] == tuple(sorted(os.listdir(demo)))
    assert (row["architecture"], row["n_genes"], row["context_length"]) == ("GPTNeoXForCausalLM", 20, 168)
    with pytest.raises(ValueError, match="nothing to download"):
        models.fetch("demo")


def test_tokenizer_without_padding_token_pads_with_eos(checkpoints, tmp_path):
    path = tmp_path / "no-pad"
    shutil.copytree(checkpoints["tiny"], path)
    tokenizer = build_tokenizer(GENES, LABELS, max_genes=20)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        config["pad_token_id"] = None
        (path / name).write_text(json.dumps(config))
    model = models.load(path, device="cpu")
    assert model.tokenizer.pad_token == "[EOS]"
    assert model.model.config.pad_token_id == model.model.generation_config.pad_token_id
    assert model.model.config.pad_token_id == model.tokenizer.eos_token_id


def test_tokenizer_that_does_not_fit_the_model_is_an_error(checkpoints, tmp_path):
    path = tmp_path / "mismatch"
    shutil.copytree(checkpoints["tiny"], path)
    build_tokenizer([f"OTHER{i}" for i in range(500)], max_genes=20).save_pretrained(path)
    with pytest.raises(ValueError, match=r"has \d+ tokens but the model embeds \d+"):
        models.load(path, device="cpu")


def test_tokenizer_files_that_are_missing_or_no_tokenizer_are_named(checkpoints, tmp_path):
    """A tokenizer that did not fit its model, read without tokenizer_config.json (transformers then guesses its
    special tokens, as some releases do), was blamed on a SentencePiece tokenizer that was not there; a
    tokenizer.json that is JSON but no tokenizer failed with transformers' KeyError 'added_tokens'."""
    model = models.load(checkpoints["tiny"], device="cpu").model
    other = build_tokenizer([f"OTHER{i}" for i in range(500)], max_genes=20)
    path = tmp_path / "no-config"
    shutil.copytree(checkpoints["tiny"], path)
    (path / "tokenizer_config.json").unlink()
    with pytest.raises(
        ValueError, match=r"tokens but the model embeds \d+: tokenizer_config\.json is missing"
    ) as error:
        _runtime.prepare_tokenizer(other, model, path)
    assert "sentencepiece" not in str(error.value)
    path = tmp_path / "empty-tokenizer"
    shutil.copytree(checkpoints["tiny"], path)
    (path / "tokenizer.json").write_text("{}")
    with pytest.raises(
        models.BrokenCheckpointError, match=r"tokenizer\.json of the checkpoint at .* is not a tokenizer"
    ):
        models.load(path, device="cpu")


def test_code_shipped_with_a_checkpoint_never_runs(checkpoints, tmp_path):
    path = tmp_path / "remote-code"
    shutil.copytree(checkpoints["tiny"], path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "custom.py").write_text("from pathlib import Path\nPath(__file__).with_name('ran').touch()\n")
    assert type(models.load(path, device="cpu").model).__name__ == "GPTNeoXForCausalLM"
    assert not (path / "ran").exists()


def test_resolve_passes_models_through_and_loads_the_rest(checkpoints):
    model = models.load(checkpoints["tiny"], device="cpu")
    assert models.resolve(model) is model
    assert models.resolve(model, device="cpu") is model
    assert model.device == torch.device("cpu")
    assert models.resolve(checkpoints["tiny"], device="cpu").sha256 == model.sha256
    with pytest.raises(TypeError, match="available"):
        models.resolve(model.model)


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    ("break_it", "match"),
    [
        (lambda p: [f.unlink() for f in p.iterdir()], r"is incomplete: it has no config\.json.*\(files there: none\)"),
        (lambda p: (p / "model.safetensors").unlink(), r"is incomplete: it has no weights \(one of model\.safetensors"),
        (lambda p: (p / "tokenizer.json").unlink(), r"is incomplete: it has no tokenizer files"),
        (lambda p: (p / "model.safetensors").write_bytes(b""), r"model\.safetensors .* is truncated: it has 0 bytes"),
        (lambda p: _truncate(p / "model.safetensors", 0.01), r"model\.safetensors .* is truncated: it has \d+ bytes"),
        (lambda p: _truncate(p / "model.safetensors", 0.9), r"model\.safetensors .* is truncated: it has \d+ bytes"),
        (lambda p: _truncate(p / "config.json", 0.5), r"config\.json .* is not valid JSON"),
        (lambda p: _truncate(p / "tokenizer.json", 0.5), r"tokenizer\.json .* is not valid JSON"),
        (lambda p: (p / "c2s_metadata.json").write_text("[1, 2"), r"c2s_metadata\.json .* cannot be read"),
        (
            lambda p: (p / "c2s_metadata.json").write_text('{"vocabulary": "CD3E"}'),
            r"c2s_metadata\.json .* cannot be read .*'vocabulary' must be a list of strings or null, not 'CD3E'",
        ),
        (
            lambda p: (p / "c2s_metadata.json").write_text('{"score_temperatures": {"3": 0}}'),
            r"'score_temperatures' must be an object of positive numbers keyed by numbers of labels re-ranked",
        ),
        (  # every score 1 / n_labels
            lambda p: (p / "c2s_metadata.json").write_text('{"score_temperatures": {"0": Infinity}}'),
            r"'score_temperatures' must be an object of positive numbers",
        ),
        (  # never looked up: annotate asks for "3"
            lambda p: (p / "c2s_metadata.json").write_text('{"score_temperatures": {"03": 2.0}}'),
            r"'score_temperatures' must be an object of positive numbers",
        ),
        (
            lambda p: (p / "c2s_metadata.json").write_text('{"sentence_lengths": {"B": 12.5}}'),
            r"'sentence_lengths' must be an object of positive integers keyed by cell type",
        ),
        (
            lambda p: (p / "c2s_metadata.json").write_text('{"rank_fit": {"slope": "x", "intercept": 1}}'),
            r"c2s_metadata\.json .* cannot be read .*`rank_fit\['slope'\]` must be a finite number, got 'x'",
        ),
    ],
    ids=[
        "empty",
        "no-weights",
        "no-tokenizer",
        "zero-byte",
        "truncated-header",
        "truncated-data",
        "config",
        "tokenizer",
        "metadata",
        "metadata-field",
        "metadata-temperatures",
        "metadata-temperature-infinite",
        "metadata-temperature-key",
        "metadata-sentence-lengths",
        "metadata-rank-fit",
    ],
)
def test_broken_checkpoint_names_the_file(checkpoints, tmp_path, break_it, match):
    """An empty directory or a damaged file used to fail in the tokenizer backend or with a bare SafetensorError."""
    path = tmp_path / "broken"
    shutil.copytree(checkpoints["tiny"], path)
    C2SMetadata(name="broken").write(path)
    break_it(path)
    with pytest.raises(ValueError, match=match) as error:
        models.load(path, device="cpu")
    assert isinstance(error.value, models.BrokenCheckpointError)
    assert str(path) in str(error.value)
    assert "save the checkpoint there again" in str(error.value)


def test_metadata_that_would_not_load_is_not_written(tmp_path):
    """`save` wrote what `load` then refused as broken."""
    with pytest.raises(TypeError, match=r"'score_temperatures' must be an object of positive numbers"):
        C2SMetadata(score_temperatures={"0": 0.0}).write(tmp_path)
    assert not (tmp_path / "c2s_metadata.json").exists()
    C2SMetadata(score_temperatures={"0": np.float32(2.5)}).write(tmp_path)  # numpy numbers are written as numbers
    assert C2SMetadata.read(tmp_path).score_temperatures == {"0": 2.5}


def test_checkpoint_put_into_a_read_only_cache_by_hand_loads(hub, cache, no_gpu, monkeypatch, scanpy_log):
    """Recording the hashes of files put there by hand failed with a bare OSError: the checkpoint could not load."""
    path = models.fetch("tiny", progressbar=False)
    (path / _download.HASHES_FILE).unlink()  # put there by hand

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(_download.tempfile, "NamedTemporaryFile", read_only)
    assert models.load("tiny").model is not None
    assert f"could not record the sha256 of config.json in {path / _download.HASHES_FILE}" in scanpy_log.getvalue()
    assert "which the registry does not pin, will go unnoticed" in scanpy_log.getvalue()
    assert not (path / _download.HASHES_FILE).exists()


def test_broken_cached_download_says_how_to_fetch_it_again(hub, checkpoints, cache, no_gpu):
    path = models.fetch("tiny", progressbar=False)
    (path / _download.HASHES_FILE).unlink()  # as if the damaged file had been put there by hand, then fetched
    _truncate(path / "model.safetensors", 0.5)
    with pytest.raises(ValueError, match=r"model\.safetensors of the checkpoint at .* is truncated") as error:
        models.load("tiny")
    message = str(error.value)
    assert f"rm '{path / 'model.safetensors'}' '{path / _download.HASHES_FILE}'" in message
    assert "sc_c2s.models.fetch('tiny', revision='rev1')" in message
    for file in (path / "model.safetensors", path / _download.HASHES_FILE):
        file.unlink()
    assert models.load("tiny").model is not None  # the advice works


def test_broken_download_of_a_revision_with_slashes_says_how_to_fetch_it_again(cache, monkeypatch):
    """A revision such as ``refs/pr/1`` is three folders of the cache; the advice named ``1`` as the revision."""
    monkeypatch.setitem(_registry.REGISTRY, "tiny", registry_entry("tiny", ["model.safetensors"]))
    folder = cache / "test" / "tiny" / "refs" / "pr" / "1"
    message = _files.broken_message(folder / "model.safetensors", "is truncated")
    assert "sc_c2s.models.fetch('tiny', revision='refs/pr/1')" in message
    assert "sc-c2s models fetch tiny --revision refs/pr/1" in message


def test_fetch_refuses_revisions_urls_and_caches_it_cannot_use(cache, monkeypatch, tmp_path):
    """A revision ``../x`` (also from an adapter's metadata) wrote outside the cache; a template field ``{owner}``
    gave a bare KeyError; a cache that is a file gave NotADirectoryError from inside pooch."""
    monkeypatch.setitem(_registry.REGISTRY, "tiny", registry_entry("tiny", ["config.json"]))
    for revision in ("../../escape", "/etc", "refs//1", "a\\..\\b", ""):
        with pytest.raises(ValueError, match=r"`revision` must be a commit, branch or tag"):
            models.fetch("tiny", revision=revision, base_url="http://127.0.0.1:9/{repo}/{revision}/{file}")
    assert not any(cache.parent.glob("escape")) and not cache.exists()
    with pytest.raises(ValueError, match=r"`base_url` 'http://h/\{owner\}/\{file\}' has the fields \['owner'\]"):
        models.fetch("tiny", base_url="http://h/{owner}/{file}")
    monkeypatch.setenv(_download.BASE_URL_ENV, "http://h/{repo}/{file")
    with pytest.raises(ValueError, match=r"\$SC_C2S_BASE_URL 'http://h/\{repo\}/\{file' has an unmatched brace \("):
        models.fetch("tiny")
    monkeypatch.delenv(_download.BASE_URL_ENV)
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(_download.CACHE_ENV, str(tmp_path / "a_file"))
    with pytest.raises(
        OSError,
        match=r"Cannot make the folder for the download of tiny, .*a_file/test/tiny/rev1: .*"
        r"Point \$SC_C2S_CACHE at a folder you can write to",
    ):
        models.fetch("tiny")


@pytest.mark.parametrize(
    ("device", "match"),
    [
        ("cuda", r"`device='cuda'` but no CUDA device is available .*; `device=None` picks cpu here"),
        ("cuda:1", r"`device='cuda:1'` but no CUDA device is available"),
        ("gpu", r"`device='gpu'` is not a torch device; pass e\.g\. 'cpu', 'cuda'"),
        (1.5, r"`device=1.5` is not a torch device"),
        ("meta", r"`device='meta'` holds no weights .*; pass 'cpu' or 'cuda'; `device=None` picks cpu here"),
        ("xpu", r"`device='xpu'` but torch .* cannot run on 'xpu' devices here; pass 'cpu', 'cuda' or 'mps'"),
        ("lazy", r"`device='lazy'` but torch .* cannot run on 'lazy' devices here"),
    ],
)
def test_device_that_torch_cannot_use(checkpoints, no_gpu, device, match):
    """`device="cuda"` without CUDA used to fail with torch's AssertionError; `device="meta"` used to leave the model
    without weights ("Cannot copy out of meta tensor"); `device="xpu"` failed in torch once the weights were read."""
    with pytest.raises(ValueError, match=match):
        models.load(checkpoints["tiny"], device=device)
    model = models.load(checkpoints["tiny"], device="cpu")
    with pytest.raises(ValueError, match=match):
        models.resolve(model, device=device)
    assert model.device == torch.device("cpu")


def test_save_writes_nothing_for_metadata_that_cannot_be_read_back(tmp_path):
    """The weights and tokenizer were written before the metadata was refused: a folder that `load` opened as a
    checkpoint without labels, vocabulary or `n_genes`."""
    model = models.load("demo")
    model.metadata.rank_fit = {"n_cells": 60, "input": "linear"}  # as `anndata.concat(uns_merge="same")` leaves it
    with pytest.raises(ValueError, match="A rank fit needs 'slope' and 'intercept'"):
        model.save(tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("resave", [False, True], ids=["new directory", "over a checkpoint"])
def test_a_save_that_stopped_half_way_is_refused(tmp_path, monkeypatch, resave):
    """A save stopped after the weights and before the metadata (a full disk; a killed process, which no cleanup
    reaches) left a directory that loaded with a warning only, prompted with the defaults: 200 genes, no labels."""
    directory = tmp_path / "model"
    if resave:
        models.load("demo").save(directory)

    def full_disk(self, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C2SMetadata, "write", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        models.load("demo").save(directory)
    monkeypatch.undo()
    with pytest.raises(_files.BrokenCheckpointError, match=r"was not saved to the end: a save into it stopped"):
        models.load(directory)
    models.load("demo").save(directory)  # saved again, to the end
    assert models.load(directory).metadata.labels == models.load("demo").metadata.labels
    assert not (directory / ".c2s_saving").exists()


def test_save_shows_no_progress_bar_of_transformers(tmp_path, capsys):
    """`save` showed transformers' "Writing model shards" bar, also at verbosity 0, as loading does not."""
    models.load("demo").save(tmp_path / "model")
    assert "Writing model shards" not in capsys.readouterr().err
    assert models.load(tmp_path / "model").metadata.name == "demo"


def test_checkpoint_files_are_read_and_written_as_utf_8(tmp_path):
    """Files opened without `encoding=` are read and written in the locale's encoding, cp1252 on Windows, where a
    tokenizer config in UTF-8 with non-ASCII text failed the save of a checkpoint (and so its whole training) and
    metadata written by another tool read back garbled."""
    code = (
        "import sys, warnings\n"
        "warnings.filterwarnings('error', category=EncodingWarning, module='sc_c2s')\n"
        "import sc_c2s\n"
        "sc_c2s.models.available()\n"
        "sc_c2s.models.load('demo').save(sys.argv[1])\n"
        "sc_c2s.models.load(sys.argv[1])\n"
    )
    command = [sys.executable, "-X", "warn_default_encoding", "-c", code, str(tmp_path / "copy")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
