"""scripts/update_registry.py, driven by a fake Hugging Face: no network."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from sc_c2s.models import _registry

ROOT = Path(__file__).parents[1]
COMMIT = "c" * 40
INDEX = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
#: The files of the fake repository at COMMIT; the ones in LFS have their sha256 in the metadata.
FILES = {
    "config.json": b"{}",
    "model.safetensors.index.json": INDEX.encode(),
    "model-00001-of-00002.safetensors": b"shard one",
    "model-00002-of-00002.safetensors": b"shard two",
    "tokenizer.model": b"sentencepiece",
    "README.md": b"# card",
}
LFS = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.model"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("update_registry", ROOT / "scripts" / "update_registry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeHub:
    """`main` of every repository is COMMIT; records what is asked for."""

    def __init__(self, root: Path):
        self.root, self.downloads, self.revisions = root, [], []

    def model_info(self, repo: str, revision: str) -> SimpleNamespace:
        self.revisions.append(revision)
        siblings = [
            SimpleNamespace(rfilename=name, lfs=SimpleNamespace(sha256=sha256(data)) if name in LFS else None)
            for name, data in FILES.items()
        ]
        return SimpleNamespace(sha=COMMIT if revision in ("main", COMMIT) else revision, siblings=siblings)

    def download(self, repo: str, filename: str, commit: str) -> Path:
        self.downloads.append(filename)
        path = self.root / repo / commit / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(FILES[filename])
        return path


@pytest.fixture
def hub(tmp_path) -> FakeHub:
    return FakeHub(tmp_path / "hub")


def entry(name: str, **changes) -> dict:
    return {
        "name": name,
        "repo": f"owner/{name}",
        "revision": "main",
        "files": ["config.json", "model.safetensors.index.json", "tokenizer.model"],
        "size_gb": 0.0,
        "architecture": "Gemma2ForCausalLM",
        "base_model": "none",
        "tasks": ["cell_type_prediction"],
        "prompt_style": "c2s",
        "n_genes": 200,
        "context_length": 8192,
        "license": None,
        "description": "A fake checkpoint.",
        "organism": "Homo sapiens",
        "sha256": {},
        "unconfirmed": ["revision", "license", "sha256"],
        "source": "The tests.",
        **changes,
    }


def test_committed_registry_is_in_the_fixed_format(script):
    path = ROOT / "src" / "sc_c2s" / "models" / _registry.REGISTRY_FILE
    assert script.dumps(script.read(path)) == path.read_text(encoding="utf-8")


def test_resolve_pins_the_commit_and_hashes_every_file_and_shard(script, hub):
    new = script.resolve(entry("x"), model_info=hub.model_info, download=hub.download)
    assert new["revision"] == COMMIT
    expected = {name: sha256(FILES[name]) for name in FILES if name != "README.md"}
    assert new["sha256"] == expected
    assert list(new["sha256"]) == sorted(expected)
    assert new["unconfirmed"] == ["license"]
    # LFS hashes come from the metadata; only files kept in Git are downloaded, each once
    assert sorted(hub.downloads) == ["config.json", "model.safetensors.index.json"]
    assert _registry._entry(new).sha256["model-00002-of-00002.safetensors"] == sha256(b"shard two")


def test_resolve_takes_another_revision(script, hub):
    other = "d" * 40
    new = script.resolve(entry("x", revision=COMMIT), model_info=hub.model_info, download=hub.download, revision=other)
    assert hub.revisions == [other]
    assert new["revision"] == other


def test_resolve_refuses_files_missing_at_the_commit(script, hub):
    with pytest.raises(LookupError, match=r"\['model.safetensors'\] are not in owner/x at c{40}"):
        script.resolve(entry("x", files=["model.safetensors"]), model_info=hub.model_info, download=hub.download)


def test_check_reports_then_update_writes_only_the_named_entry(script, hub, tmp_path, capsys):
    path = tmp_path / "registry.json"
    text = script.dumps([entry("a"), entry("b")])
    path.write_text(text, encoding="utf-8")
    fake = {"model_info": hub.model_info, "download": hub.download}

    assert script.main(["--registry", str(path), "--check", "a"], **fake) == 1
    assert path.read_text(encoding="utf-8") == text
    assert f"revision: 'main' -> '{COMMIT}'" in capsys.readouterr().out

    assert script.main(["--registry", str(path), "a"], **fake) == 0
    a, b = script.read(path)
    assert (a["revision"], b["revision"]) == (COMMIT, "main")
    assert b == entry("b")
    assert path.read_text(encoding="utf-8") == script.dumps([a, b])
    assert script.main(["--registry", str(path), "--check", "a"], **fake) == 0
    assert "a: up to date" in capsys.readouterr().out


def test_unknown_name_is_an_error(script, hub, tmp_path, capsys):
    path = tmp_path / "registry.json"
    path.write_text(script.dumps([entry("a")]), encoding="utf-8")
    with pytest.raises(SystemExit):
        script.main(["--registry", str(path), "nope"], model_info=hub.model_info, download=hub.download)
    assert "no entries called ['nope']" in capsys.readouterr().err
