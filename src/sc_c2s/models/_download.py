"""Downloading registry checkpoints into one cache folder, with retries, atomic writes and sha256 checks."""

from __future__ import annotations

import json
import os
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from scanpy import logging as logg

from sc_c2s._utils._progress import show_progress

from . import _files, _registry

if TYPE_CHECKING:
    from datetime import datetime

#: Environment variable that moves the download cache.
CACHE_ENV = "SC_C2S_CACHE"
#: Environment variable that points downloads at a mirror or a local server.
BASE_URL_ENV = "SC_C2S_BASE_URL"
#: Where files come from by default.
HF_URL = "https://huggingface.co/{repo}/resolve/{revision}/{file}"
#: File beside the downloaded files that records the sha256 of each at its first download.
HASHES_FILE = "sha256.json"
#: Further attempts after a failed download (waiting 1 s, 2 s, … between them).
RETRIES = 3


def cache_dir() -> Path:
    """Folder that holds downloaded checkpoints: ``$SC_C2S_CACHE``, else the user cache of the OS."""
    import pooch  # here, not at import: it adds a fifth to the time `import sc_c2s` takes

    return Path(os.environ.get(CACHE_ENV) or pooch.os_cache("sc_c2s")).expanduser().absolute()


def file_url(base_url: str, repo: str, revision: str, file: str) -> str:
    """URL of a checkpoint file.

    A `base_url` with ``{repo}``, ``{revision}`` or ``{file}`` fields is a template; any other is the root of a
    Hugging Face mirror, under which files are at ``{repo}/resolve/{revision}/{file}``.
    """
    template = base_url if "{" in base_url else base_url.rstrip("/") + "/{repo}/resolve/{revision}/{file}"
    return template.format(repo=repo, revision=revision, file=file)


def check_base_url(base_url: str, source: str) -> str:
    """Return `base_url` if :func:`file_url` can fill it in, else raise naming `source` (the argument or variable)."""
    if not isinstance(base_url, str):
        msg = f"{source} must be a URL (a string), got a {type(base_url).__name__}."
        raise TypeError(msg)
    example = "e.g. 'https://mirror.example.org/{repo}/resolve/{revision}/{file}'"
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(base_url) if field is not None}
    except ValueError as e:
        msg = (
            f"{source} {base_url!r} has an unmatched brace ({e}); a template's fields are {{repo}}, {{revision}} "
            f"and {{file}} ({example})."
        )
        raise ValueError(msg) from None
    unknown = sorted(fields - {"repo", "revision", "file"})
    if unknown:
        msg = (
            f"{source} {base_url!r} has the fields {unknown}; a template may hold only {{repo}}, {{revision}} and "
            f"{{file}} ({example}), and a mirror's root none."
        )
        raise ValueError(msg)
    return base_url


def check_revision(revision: str) -> str:
    """Return `revision` if it names a folder inside the checkpoint's (``refs/pr/1`` does), else raise."""
    parts = revision.split("/") if isinstance(revision, str) else None
    if not parts or any(part in {"", ".", ".."} or "\\" in part for part in parts):
        msg = (
            f"`revision` must be a commit, branch or tag of the checkpoint's repository (e.g. 'main' or a commit "
            f"hash), got {revision!r}."
        )
        raise ValueError(msg)
    return revision


def fetch(
    name: str, *, revision: str | None = None, base_url: str | None = None, progressbar: bool | None = None
) -> Path:
    """Download a registry checkpoint into the cache, or check the copy that is there.

    Files go to ``{cache}/{repo}/{revision}/``, where the cache is ``$SC_C2S_CACHE`` or the user cache folder of
    the OS (``~/.cache/sc_c2s`` on Linux). A download is written to a temporary file and moved into place only
    when complete, and retried after a failure. Each file's sha256 is checked against the registry's where it
    has one; otherwise it is recorded at the first download (trust on first use) in ``sha256.json`` beside
    the files, and every later call checks the files against it.

    Parameters
    ----------
    name
        A name from :func:`~sc_c2s.models.available` (not ``"demo"``, which comes with the package), or its
        Hugging Face repository.
    revision
        Commit, branch or tag; ``None`` takes the registry's pinned revision. Known hashes apply to that
        revision only.
    base_url
        Where to download from instead of Hugging Face: the root of a mirror, or a template with ``{repo}``,
        ``{revision}`` and ``{file}`` fields. Defaults to ``$SC_C2S_BASE_URL``, then to
        ``https://huggingface.co/{repo}/resolve/{revision}/{file}``.
    progressbar
        Show a progress bar per downloaded file; ``None`` shows them unless :attr:`scanpy.settings.verbosity` is
        ``0`` (errors only), like every progress bar of this package.

    Returns
    -------
    The folder holding the checkpoint's files, ready for :func:`~sc_c2s.models.load`.

    Raises
    ------
    ConnectionError
        When a file cannot be downloaded. The message lists the missing files, their URLs and the folder where
        they can be put by hand.
    ValueError
        When a file does not match its sha256: the registry's, or the one recorded at its first download; when
        `revision` is no folder name inside the checkpoint's (``".."``), or `base_url` has fields other than those
        above.
    OSError
        When the cache cannot hold the checkpoint's folder (it is a file, or not writable).

    Examples
    --------
    >>> import sc_c2s
    >>> path = sc_c2s.models.fetch("C2S-Pythia-410m-cell-type-prediction")  # doctest: +SKIP
    >>> sorted(p.name for p in path.iterdir())  # doctest: +SKIP
    ['config.json', 'generation_config.json', 'model.safetensors', 'sha256.json', ...]

    Without network, put the files in the folder named by the error; a mirror can replace Hugging Face:

    >>> import os
    >>> os.environ["SC_C2S_BASE_URL"] = "https://hf-mirror.example.org"  # doctest: +SKIP
    """
    if name == _registry.DEMO:
        msg = (
            f"{name!r} comes with the package; there is nothing to download. Open it by its name: `load({name!r})`, "
            f"or `--model {name}` in the sc-c2s command."
        )
        raise ValueError(msg)
    entry = _registry.get(name)
    source = "`base_url`"
    if not base_url:
        base_url, source = os.environ.get(BASE_URL_ENV) or HF_URL, f"${BASE_URL_ENV}"
    download = _Download(
        entry=entry,
        revision=entry.revision if revision is None else check_revision(revision),
        base_url=check_base_url(base_url, source),
        progressbar=show_progress() if progressbar is None else progressbar,
    )
    for file in entry.files:
        download.get(file)
    for index in (f for f in entry.files if f.endswith(".index.json")):
        for shard in _shards(download.directory / index):
            download.get(shard)
    if download.start is not None:
        logg.info("    finished", time=download.start)
    return download.directory


def recorded_hashes(directory: Path) -> dict[str, str]:
    """Read the sha256 of each file of a fetched checkpoint from its ``sha256.json``."""
    path = directory / HASHES_FILE
    if not path.is_file():
        return {}
    why = _files.file_problem(path)
    if why is not None:
        msg = (
            f"{path}, the hashes of the files fetched there, {why}. Delete it, `rm '{path}'`: the files are "
            "checked against the registry or recorded again at the next fetch."
        )
        raise _files.BrokenCheckpointError(msg)
    return json.loads(path.read_text(encoding="utf-8"))


def _shards(index: Path) -> list[str]:
    """List the weight files that the ``*.index.json`` of a sharded checkpoint names: files beside it."""
    try:
        names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        why = f"is not the index of a sharded checkpoint (a `weight_map` of tensors to files): {e!r}"
        raise _files.BrokenCheckpointError(_files.broken_message(index, why)) from e
    outside = sorted(str(n) for n in names if not isinstance(n, str) or Path(n).name != n or n in {"", ".", ".."})
    if outside:
        why = f"names weight files outside its folder: {outside[:3]}"
        raise _files.BrokenCheckpointError(_files.broken_message(index, why))
    return sorted(names)


class _Download:
    """The files of one checkpoint revision: downloads what is missing and checks what is there."""

    def __init__(self, *, entry: _registry.RegistryEntry, revision: str, base_url: str, progressbar: bool):
        self.entry, self.revision, self.base_url, self.progressbar = entry, revision, base_url, progressbar
        self.directory = cache_dir() / entry.repo / revision
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            msg = (
                f"Cannot make the folder for the download of {entry.name}, {self.directory}: {e}. Point "
                f"${CACHE_ENV} at a folder you can write to (e.g. `export {CACHE_ENV}=~/sc_c2s_cache`)."
            )
            raise OSError(msg) from e
        self.known = entry.sha256 if revision == entry.revision else {}
        self.hashes = recorded_hashes(self.directory)
        self.start: datetime | None = None

    def get(self, file: str) -> None:
        import pooch
        import requests

        path = self.directory / file
        if path.is_file():
            self._check(file, pooch.file_hash(str(path)))
            return
        if self.start is None:
            self.start = logg.info(f"downloading {self.entry.name} ({self.revision}) to {self.directory}")
        url = file_url(self.base_url, self.entry.repo, self.revision, file)
        storage = pooch.Pooch(
            path=self.directory,
            base_url="",
            registry={file: self.known.get(file)},
            urls={file: url},
            retry_if_failed=RETRIES,
        )
        try:
            storage.fetch(file, progressbar=self.progressbar)
        except requests.RequestException as e:
            raise ConnectionError(self._offline_message(e)) from e
        except ValueError as e:
            if file not in self.known:
                raise
            msg = (
                f"{file} downloaded from {url} does not match the sha256 the registry pins for {self.entry.name} "
                f"at {self.revision}: {e}\nThe download was discarded. The server may hold another revision of "
                f"the file; check the mirror set by `base_url` or ${BASE_URL_ENV}."
            )
            raise ValueError(msg) from e
        why = _files.file_problem(path)
        recorded = self.hashes.get(file)
        actual = pooch.file_hash(str(path))
        if why is not None or (file not in self.known and recorded is not None and actual != recorded):
            path.unlink()
            reason = (
                f"{why} (a server's error page, or a transfer cut short?)"
                if why is not None
                else f"differs from the file first downloaded here (sha256 {recorded}, recorded in "
                f"{self.directory / HASHES_FILE}): the revision {self.revision!r} moved, or the mirror serves "
                f"another one. To take the new files, delete what was fetched, `rm -r '{self.directory}'`, and "
                "fetch again; to keep the old ones, restore this file from a copy"
            )
            msg = f"{file} downloaded from {url} {reason}. The download was discarded."
            raise ValueError(msg)
        self._check(file, actual)

    def _check(self, file: str, actual: str) -> None:
        """Compare a file's hash with the known or recorded one, and record it."""
        expected = self.known.get(file) or self.hashes.get(file)
        if expected is not None and actual != expected:
            origin = "the registry pins" if file in self.known else "was recorded at its first download"
            path = self.directory / file
            msg = (
                f"{path} does not match the sha256 that {origin}: expected {expected}, got {actual}. The file "
                f"changed or is damaged. Delete it and fetch it again:\n    rm {str(path)!r}\n"
                f"    sc_c2s.models.fetch({self.entry.name!r}, revision={self.revision!r})"
            )
            raise ValueError(msg)
        if self.hashes.get(file) != actual:
            # other processes (Dask workers) may be fetching the same checkpoint: keep what they recorded
            self.hashes = {**recorded_hashes(self.directory), **self.hashes, file: actual}
            try:
                self._record()
            except OSError as error:  # a read-only cache the files were put into by hand: loading goes on
                if file not in self.known:  # pinned files are checked against the registry whatever is recorded
                    logg.warning(
                        f"could not record the sha256 of {file} in {self.directory / HASHES_FILE} ({error}): a "
                        "later change of this file, which the registry does not pin, will go unnoticed"
                    )

    def _record(self) -> None:
        """Write the hashes into the hashes file, through a temporary file of this process's own."""
        tmp = tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=self.directory, prefix=f".{HASHES_FILE}.", suffix=".tmp", delete=False
        )
        try:
            with tmp:
                tmp.write(json.dumps(self.hashes, indent=2, sort_keys=True) + "\n")
            Path(tmp.name).replace(self.directory / HASHES_FILE)
        finally:  # written or not, no temporary file is left behind
            Path(tmp.name).unlink(missing_ok=True)

    def _offline_message(self, error: Exception) -> str:
        files, indexes_missing = list(self.entry.files), False
        for index in (f for f in self.entry.files if f.endswith(".index.json")):
            try:
                files += _shards(self.directory / index)
            except (OSError, _files.BrokenCheckpointError):  # missing, or damaged: fetched again with its shards
                indexes_missing = True
        missing = [f for f in files if not (self.directory / f).is_file()]
        urls = "\n".join(f"    {file_url(self.base_url, self.entry.repo, self.revision, f)}  ->  {f}" for f in missing)
        shards = "\nand the shards listed in each *.index.json, from the same place" if indexes_missing else ""
        return (
            f"Could not download {self.entry.name} ({self.entry.repo} at {self.revision}): {error}\n"
            f"To install the checkpoint by hand (without network, say), download these files elsewhere and put "
            f"them in\n    {self.directory}\nunder these names:\n{urls}{shards}\n"
            f"Files already there are checked, not downloaded again. To download from a mirror instead, set "
            f"${BASE_URL_ENV} or pass `base_url` to `sc_c2s.models.fetch`."
        )
