from __future__ import annotations

import contextlib
import io
import re
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import mudata as md
import numpy as np
import pooch
import pytest
import scanpy as sc
from matplotlib import pyplot as plt

DATA = Path(__file__).parent / "data"
#: Longest sentence of the `short_sentences` cells.
SHORT_SENTENCE_GENES = 12


@pytest.fixture(autouse=True)
def _close_figures():
    """Close the figures a test drew, so that the suite never holds more than matplotlib warns about."""
    yield
    plt.close("all")


@pytest.fixture(scope="session")
def _cellbench() -> ad.AnnData:
    return ad.read_h5ad(DATA / "cellbench_300.h5ad")


@pytest.fixture(scope="session")
def _pbmc4k() -> ad.AnnData:
    return ad.read_h5ad(DATA / "pbmc4k_500.h5ad")


@pytest.fixture(scope="session")
def _pbmc68k() -> ad.AnnData:
    return sc.datasets.pbmc68k_reduced()


@pytest.fixture
def cellbench(_cellbench) -> ad.AnnData:
    """300 CellBench cells × 2,000 genes: raw counts (CSR float32), `cell_type`, `batch`, `var['gene_symbol']`."""
    return _cellbench.copy()


@pytest.fixture
def pbmc4k(_pbmc4k) -> ad.AnnData:
    """500 PBMC 4k cells × 2,000 genes: raw counts (CSR float32), `cluster`, placeholder gene names."""
    return _pbmc4k.copy()


@pytest.fixture
def pbmc68k(_pbmc68k) -> ad.AnnData:
    """scanpy's 700 PBMCs × 765 genes: scaled `X`, log-normalised `.raw`, `bulk_labels`."""
    return _pbmc68k.copy()


@dataclass
class Container:
    """Puts an AnnData into the container under test and gets the modality back out."""

    is_mudata: bool

    def wrap(self, adata: ad.AnnData) -> ad.AnnData | md.MuData:
        """The AnnData itself, or a MuData whose ``"rna"`` modality it is."""
        if not self.is_mudata:
            return adata
        with md.set_options(pull_on_update=False):
            return md.MuData({"rna": adata})

    def rna(self, data: ad.AnnData | md.MuData) -> ad.AnnData:
        """The AnnData that holds the results."""
        return data.mod["rna"] if self.is_mudata else data


@pytest.fixture(params=[False, True], ids=["AnnData", "MuData"])
def container(request) -> Container:
    """Run a test on AnnData and on MuData."""
    return Container(request.param)


@contextlib.contextmanager
def captured_log(verbosity: str = "hint") -> Iterator[io.StringIO]:
    """Send what scanpy logs at `verbosity` to a stream (by default with the `deep` details of `finished`)."""
    stream = io.StringIO()
    logfile, before = sc.settings.logfile, sc.settings.verbosity
    sc.settings.logfile, sc.settings.verbosity = stream, verbosity
    try:
        yield stream
    finally:
        sc.settings.logfile, sc.settings.verbosity = logfile, before


@pytest.fixture
def scanpy_log():
    """A stream receiving what scanpy logs during the test, including the `deep` details of `finished`."""
    with captured_log() as stream:
        yield stream


@pytest.fixture
def n_jobs():
    """Restore `scanpy.settings.n_jobs` after a test that changes it."""
    previous = sc.settings.n_jobs
    yield
    sc.settings.n_jobs = previous


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one torch thread, and then do not fight over the cores of a shared runner."""
    import torch

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture
def few_temperature_cells(monkeypatch):
    """`finetune` chooses the sampling temperature on the fewest cells per type, for tests about something else.

    The 200 cells of the default take most of the time of a tiny model's training (15 s of one test's 21 s).
    """
    from sc_c2s.tl import _temperature

    monkeypatch.setattr(_temperature, "N_CELLS", 0)


@pytest.fixture(scope="session")
def _short_sentences(_cellbench) -> ad.AnnData:
    import sc_c2s

    adata = _cellbench[::8].copy()
    # no strings: they would no longer match the shortened sentences
    sc_c2s.pp.to_sentences(
        adata, gene_symbols="gene_symbol", n_genes=SHORT_SENTENCE_GENES, rank_fit=False, sentences=False
    )
    genes = adata.obsm["c2s_genes"]
    for i, n in enumerate(3 + np.arange(adata.n_obs) % 10):
        genes[i, n:] = -1
    return adata


@pytest.fixture
def short_sentences(_short_sentences) -> ad.AnnData:
    """38 CellBench cells whose sentences have 3 to 12 genes, so that batches mix prompt lengths."""
    return _short_sentences.copy()


# --- checkpoints served like Hugging Face, from 127.0.0.1 ----------------------------------------------------------


class CheckpointServer(ThreadingHTTPServer):
    """Serves the files under `root` at their relative paths on a free port of 127.0.0.1.

    `requests` counts GET requests per path. `drop[name] = n` makes the next `n` requests for files called `name`
    announce the full ``Content-Length``, send half the bytes and close the connection.
    """

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.requests: Counter[str] = Counter()
        self.drop: Counter[str] = Counter()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: CheckpointServer

    def do_GET(self) -> None:
        path = self.server.root / self.path.lstrip("/")
        with self.server.lock:
            self.server.requests[self.path] += 1
            drop = self.server.drop[path.name] > 0
            self.server.drop[path.name] -= drop
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if drop else data)
        self.close_connection = True

    def log_message(self, *args) -> None:
        """Keep the test output quiet."""


def registry_entry(name: str, files: list[str], **kwargs):
    """A registry entry for a tiny checkpoint served at ``test/{name}``, revision ``rev1``."""
    from sc_c2s.models import _registry

    fields = {
        "name": name,
        "repo": f"test/{name}",
        "revision": "rev1",
        "files": tuple(files),
        "size_gb": 0.0,
        "architecture": "GPTNeoXForCausalLM",
        "base_model": "none",
        "tasks": ("cell_type_prediction",),
        "prompt_style": "c2s",
        "n_genes": 20,
        "context_length": 168,
        "license": "BSD-3-Clause",
        "description": "A tiny checkpoint built by the tests.",
    }
    return _registry.RegistryEntry(**{**fields, **kwargs})


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty download cache for the test."""
    from sc_c2s.models import _download

    path = tmp_path / "cache"
    monkeypatch.setenv(_download.CACHE_ENV, str(path))
    return path


@pytest.fixture
def checkpoint_server(cache, tmp_path, monkeypatch):
    """A :class:`CheckpointServer` on 127.0.0.1 that downloads go to, serving `tmp_path / "server"`."""
    from sc_c2s.models import _download

    root = tmp_path / "server"
    root.mkdir()
    monkeypatch.setattr(pooch.core.time, "sleep", lambda seconds: None)
    server = CheckpointServer(root)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    monkeypatch.setenv(_download.BASE_URL_ENV, server.url)
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def publish(checkpoint_server, monkeypatch):
    """Serve a checkpoint directory as registry checkpoint ``test/{name}`` at revision ``rev1``, for the test.

    The registry lists every file but the weight shards, which ``fetch`` reads from the index, as for the
    published Gemma-2 checkpoints.
    """
    from sc_c2s.models import _registry

    def publish(name: str, source: Path, **kwargs) -> _registry.RegistryEntry:
        shutil.copytree(source, checkpoint_server.root / "test" / name / "resolve" / "rev1")
        files = sorted(p.name for p in source.iterdir() if not re.fullmatch(r"model-.*-of-.*", p.name))
        entry = registry_entry(name, files, **kwargs)
        monkeypatch.setitem(_registry.REGISTRY, name, entry)
        return entry

    return publish


# --- tokenizers and models shaped like the published checkpoints' --------------------------------------------------

#: Special tokens of Gemma's tokenizer, at Gemma's ids.
GEMMA_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>")


def _training_text(genes, labels) -> list[str]:
    """Text to train a test tokenizer on: the templates, the labels' answers, and the genes in sentences."""
    from sc_c2s import prompts

    genes = list(genes)
    sentences = [" ".join(genes[i : i + 50]) + "." for i in range(0, len(genes), 50)]
    return [
        *(
            prompts.CELL_TYPE_PREDICTION.format(num_genes=n, organism=o, cell_sentence=s)
            for n, o, s in zip((12, 200), prompts.ORGANISMS, sentences[:2] or [""], strict=False)
        ),
        *(
            prompts.CELL_TYPE_GENERATION.format(num_genes=n, organism=o, cell_type=t)
            for n, o in zip((12, 200), prompts.ORGANISMS, strict=True)
            for t in labels
        ),
        *(prompts.answer(label) for label in labels),
        *sentences,
    ]


def gemma_tokenizer(genes, labels=(), *, vocab_size: int = 1000):
    """A tokenizer that behaves like Gemma's, trained in a fraction of a second on the genes and the templates.

    SentencePiece-style BPE: spaces become ``▁``, which starts a word's first token; no prefix space; bytes of
    characters it has no token for fall back to ``<0x..>`` tokens; ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>`` at
    Gemma's ids 0–3, and ``<bos>`` in front of every text. As Gemma's, it has tokens that cross word boundaries:
    the last token of each gene merges with the period that ends a sentence, as ``▁cell.`` does in labels.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import GemmaTokenizerFast  # GemmaTokenizer is the slow SentencePiece one before transformers 5

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # for training: no merges over ▁
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(GEMMA_SPECIAL), show_progress=False)
    tokenizer.train_from_iterator(_training_text(genes, labels), trainer)
    # Gemma's pre-tokenizer splits on " ", which the normaliser has replaced: merges apply across words
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    # the period goes with the token before it, not with the line break after it
    merges = spec["model"]["merges"] = [m for m in spec["model"]["merges"] if m[0] != "."]
    for byte in range(256):  # ordinary tokens, as in Gemma's vocabulary, not special ones
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    for gene in genes:
        last = tokenizer.encode("▁" + gene).tokens[-1]
        if last + "." not in vocab and last in vocab:
            vocab[last + "."] = len(vocab)
            merges.append([last, "."])
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return GemmaTokenizerFast(tokenizer_object=tokenizer, mask_token=None, model_max_length=1024)


def sentencepiece_model(genes, labels=(), *, vocab_size: int = 1000) -> bytes:
    """A SentencePiece model (``tokenizer.model``) trained like Gemma's, as the published Gemma-2 checkpoints ship it.

    BPE with byte fallback, no dummy prefix, ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>`` at ids 0–3. Needs
    sentencepiece (the ``gemma`` extra).
    """
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text(genes, labels)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        max_sentence_length=100_000,
        minloglevel=2,
        **{f"{name}_id": i for i, name in enumerate(("pad", "eos", "bos", "unk"))},
        **{f"{name}_piece": f"<{name}>" for name in ("pad", "eos", "bos", "unk")},
    )
    return model.getvalue()


def neox_tokenizer(genes, labels=(), *, vocab_size: int = 1000):
    """A tokenizer that behaves like Pythia's (GPT-NeoX-20B's): byte-level BPE, where ``Ġ`` marks a space.

    ``<|endoftext|>`` is its BOS, EOS and unknown token, it has no padding token, adds no BOS and pads on the
    right, as the published Pythia tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPTNeoXTokenizerFast  # named GPTNeoXTokenizer too since transformers 5

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(genes, labels), trainer)
    end = "<|endoftext|>"
    return GPTNeoXTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=end,
        eos_token=end,
        unk_token=end,
        pad_token=None,
        padding_side="right",
        model_max_length=1024,
    )


def padded_vocabulary(tokenizer, multiple: int = 64) -> int:
    """Rows of the embedding for `tokenizer`: more than its tokens, as Pythia's 50,304 rows for 50,277 tokens."""
    return (len(tokenizer) // multiple + 1) * multiple


def gemma2_model(tokenizer, *, sliding_window: int = 4096, n_layers: int = 2, seed: int = 0):
    """A random Gemma-2 as the published ones are made, only tiny: alternating sliding-window and global
    attention layers, soft-capped attention and final logits, grouped-query attention, tied embeddings."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=padded_vocabulary(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=sliding_window,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    return Gemma2ForCausalLM(config).eval()


def neox_model(tokenizer, *, n_layers: int = 2, seed: int = 0):
    """A random GPT-NeoX shaped like Pythia, only tiny: rotary on a quarter of each head, parallel residual."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=padded_vocabulary(tokenizer),
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        rotary_pct=0.25,
        use_parallel_residual=True,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config).eval()


def save_published(model, tokenizer, path: Path) -> Path:
    """Save as the published checkpoints are: weights in shards with an index, the tokenizer, no C2S metadata."""
    model.save_pretrained(path, max_shard_size="50KB")
    tokenizer.save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="session")
def builders() -> SimpleNamespace:
    """The builders above, for test modules (which cannot import this file)."""
    return SimpleNamespace(
        gemma_tokenizer=gemma_tokenizer,
        sentencepiece_model=sentencepiece_model,
        neox_tokenizer=neox_tokenizer,
        gemma2_model=gemma2_model,
        neox_model=neox_model,
        save_published=save_published,
    )
