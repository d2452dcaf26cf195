"""Pin the checkpoint registry to commits and record the sha256 of every file, from Hugging Face.

Run from the repository root where Hugging Face is reachable (``huggingface_hub`` comes with transformers; set
``HF_TOKEN`` for gated repositories):

    python scripts/update_registry.py [NAME ...] [--revision REV] [--check]

For each entry of ``src/sc_c2s/models/registry.json`` (or those named), the revision it names — a branch such as
``main``, or a commit — is resolved to its full commit hash, and the sha256 of each file in ``files`` and of each
shard listed in a ``*.index.json`` is recorded: Git LFS files from the Hub's metadata (``lfs.sha256``), the
others by downloading them at that commit and hashing them. ``revision`` and ``sha256`` are then dropped from the
entry's ``unconfirmed``. ``--revision`` moves one entry to another branch, tag or commit (``--revision main``: its
newest commit). The file is rewritten in a fixed format (keys in a fixed order, indent 2, a trailing newline), so
that a diff shows only what changed; update ``source`` by hand to say where the new values come from.

``--check`` changes nothing: it reports what an update would change and exits with 1 if anything would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REGISTRY = Path(__file__).resolve().parents[1] / "src" / "sc_c2s" / "models" / "registry.json"
#: Keys of an entry in the order they are written: the fields of ``RegistryEntry``, then ``source``.
KEYS = (
    "name",
    "repo",
    "revision",
    "files",
    "size_gb",
    "architecture",
    "base_model",
    "tasks",
    "prompt_style",
    "n_genes",
    "context_length",
    "license",
    "description",
    "organism",
    "sha256",
    "unconfirmed",
    "source",
)
#: ``unconfirmed`` values that an update confirms.
CONFIRMED = ("revision", "sha256")

#: ``model_info(repo, revision)``: an object with the commit ``sha`` and ``siblings`` (``rfilename``, ``lfs``), as
#: ``huggingface_hub.HfApi.model_info(..., files_metadata=True)`` returns it.
ModelInfo = Callable[[str, str], Any]
#: ``download(repo, filename, commit)``: the path of the file downloaded at that commit.
Download = Callable[[str, str, str], Path]


def read(path: Path) -> list[dict[str, Any]]:
    """Read the entries of a registry file."""
    return json.loads(path.read_text(encoding="utf-8"))["checkpoints"]


def dumps(entries: list[dict[str, Any]]) -> str:
    """Write entries in the fixed format of ``registry.json``."""
    return json.dumps({"checkpoints": [_ordered(e) for e in entries]}, indent=2, ensure_ascii=False) + "\n"


def _ordered(entry: dict[str, Any]) -> dict[str, Any]:
    if set(entry) != set(KEYS):
        msg = f"Entry {entry.get('name')!r} has keys {sorted(entry)}; registry.json entries have {list(KEYS)}."
        raise ValueError(msg)
    return {key: dict(sorted(entry[key].items())) if key == "sha256" else entry[key] for key in KEYS}


def resolve(
    entry: dict[str, Any], *, model_info: ModelInfo, download: Download, revision: str | None = None
) -> dict[str, Any]:
    """Pin an entry to the commit its revision (or `revision`) names, with the sha256 of every file.

    Raises
    ------
    LookupError
        When a file of ``files``, or a shard named in an index, is not in the repository at that commit.
    """
    repo = entry["repo"]
    info = model_info(repo, revision or entry["revision"])
    commit, siblings = info.sha, {s.rfilename: s for s in info.siblings}
    paths: dict[str, Path] = {}

    def local(name: str) -> Path:
        if name not in paths:
            paths[name] = Path(download(repo, name, commit))
        return paths[name]

    names = list(entry["files"])
    for index in (f for f in entry["files"] if f.endswith(".index.json") and f in siblings):
        names += sorted(set(json.loads(local(index).read_text(encoding="utf-8"))["weight_map"].values()))
    missing = [name for name in names if name not in siblings]
    if missing:
        msg = (
            f"{entry['name']}: {missing} are not in {repo} at {commit}. Correct `files` in registry.json (the "
            "repository lists: " + ", ".join(sorted(siblings)) + ")."
        )
        raise LookupError(msg)
    hashes = {name: _lfs_sha256(siblings[name]) or sha256(local(name)) for name in names}
    return {
        **entry,
        "revision": commit,
        "sha256": dict(sorted(hashes.items())),
        "unconfirmed": [field for field in entry["unconfirmed"] if field not in CONFIRMED],
    }


def _lfs_sha256(sibling: Any) -> str | None:
    """The sha256 the Hub records for a Git LFS file; ``None`` for a file stored in Git."""
    lfs = sibling.lfs
    if lfs is None:
        return None
    return lfs.sha256 if hasattr(lfs, "sha256") else lfs["sha256"]


def sha256(path: Path) -> str:
    """Hash a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Describe, one line each, how an entry changed."""
    lines = [f"  {key}: {old[key]!r} -> {new[key]!r}" for key in KEYS if key != "sha256" and old[key] != new[key]]
    for file in sorted(set(old["sha256"]) | set(new["sha256"])):
        before, after = old["sha256"].get(file), new["sha256"].get(file)
        if before != after:
            lines.append(f"  sha256 of {file}: {before} -> {after}")
    return lines


def hub() -> tuple[ModelInfo, Download]:
    """Read metadata and download files from Hugging Face."""
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()

    def model_info(repo: str, revision: str) -> Any:
        return api.model_info(repo, revision=revision, files_metadata=True)

    def download(repo: str, filename: str, commit: str) -> Path:
        return Path(hf_hub_download(repo, filename, revision=commit))

    return model_info, download


def main(
    argv: list[str] | None = None, *, model_info: ModelInfo | None = None, download: Download | None = None
) -> int:
    """Update or check the registry; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="entries to update (default: all)")
    parser.add_argument("--revision", help="branch, tag or commit to pin the one NAME to (default: its own)")
    parser.add_argument("--check", action="store_true", help="report differences, change nothing")
    parser.add_argument("--registry", type=Path, default=REGISTRY, help="the registry file (default: %(default)s)")
    args = parser.parse_args(argv)
    text = args.registry.read_text(encoding="utf-8")
    entries = read(args.registry)
    unknown = set(args.names) - {e["name"] for e in entries}
    if unknown:
        parser.error(f"no entries called {sorted(unknown)} in {args.registry}")
    if args.revision is not None and len(args.names) != 1:
        parser.error("--revision needs exactly one NAME")
    if model_info is None or download is None:
        model_info, download = hub()

    updated = []
    for entry in entries:
        if args.names and entry["name"] not in args.names:
            updated.append(entry)
            continue
        try:
            new = resolve(entry, model_info=model_info, download=download, revision=args.revision)
        except LookupError as e:
            print(e, file=sys.stderr)
            return 2
        lines = changes(entry, new)
        print(f"{entry['name']}: " + ("\n".join(["changes", *lines]) if lines else "up to date"))
        updated.append(new)
    new_text = dumps(updated)
    if new_text == text:
        return 0
    if args.check:
        if dumps(entries) != text:
            print(f"{args.registry} is not in the fixed format; an update rewrites it.")
        return 1
    args.registry.write_text(new_text, encoding="utf-8")
    print(f"wrote {args.registry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
