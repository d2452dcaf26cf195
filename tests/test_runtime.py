"""The model runtime: the cache under transformers' current name, padding, saving, device choice, progress bars."""

from __future__ import annotations

import json
import threading
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import scanpy as sc
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

import sc_c2s
from sc_c2s._compat import cache_name
from sc_c2s.models import C2SMetadata, C2SModel, _runtime, _trainer
from sc_c2s.models._runtime import device_and_dtype
from sc_c2s.models._scratch import build_model, build_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GENES = ["CD3D", "IL7R", "LTB", "MS4A1", "CD79A", "NKG7"]


@pytest.fixture(scope="module")
def tiny() -> C2SModel:
    tokenizer = build_tokenizer(GENES, ["T cell", "B cell"], max_genes=10)
    model = build_model(tokenizer, hidden_size=16, n_layers=2, n_heads=2).eval()
    return C2SModel(model, tokenizer, C2SMetadata(name="tiny", labels=["B cell", "T cell"]), Path("tiny"))


def collect_batches(model, ids, **kwargs) -> list[_runtime.Batch]:
    out = []
    _runtime.run_batches(model, ids, out.append, desc="", **kwargs)
    return out


def test_cache_name_follows_the_installed_transformers():
    assert cache_name() in {f.name for f in fields(CausalLMOutputWithPast)}
    assert cache_name() in {"cache", "past_key_values"}


def test_threads_running_a_model_at_once_restore_its_training_flag_after_the_last():
    """The first thread out of `inference` put a model passed in training mode back into it while another still ran
    (Dask's threads in this process: those chunks ran with dropout), and the last one out left it in eval mode."""
    model = torch.nn.Dropout(0.5).train()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with _runtime.inference(model):
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with _runtime.inference(model):
            second_in.set()
            first_out.wait(10)
            seen["training while running"] = model.training

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"training while running": False}
    assert model.training
    assert not _runtime._IN_INFERENCE


def test_left_pad():
    ids, mask, positions = _runtime.left_pad([[5, 6, 7], [8], []], pad_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(positions, [[0, 1, 2], [0, 0, 0], [0, 0, 0]])


def test_decoding_over_the_cache_equals_full_forward_passes(tiny):
    """Each step of `decode` over the KV cache gives the logits of a fresh pass over the whole padded sequence."""
    tokenizer, model = tiny.tokenizer, tiny.model
    prompts = [sc_c2s.prompts.cell_type_prediction(cell) for cell in (GENES[:3], GENES[3:4])]
    ids = _runtime.tokenize(tokenizer, prompts)
    (batch,) = collect_batches(model, ids, batch_size=2, pad_id=tokenizer.pad_token_id)
    with _runtime.inference(model):
        tokens, logp = _runtime.decode(model, batch, max_new_tokens=4, stop_ids=[], pad_id=tokenizer.pad_token_id)
        for row, cell in enumerate(batch.index):
            sequence = torch.as_tensor([[*ids[cell], *tokens[row].tolist()]])
            full = model(input_ids=sequence).logits[0, len(ids[cell]) - 1 : -1].log_softmax(-1)
            assert tokens[row].tolist() == full.argmax(-1).tolist()  # greedy
            np.testing.assert_allclose(logp[row], full.gather(1, tokens[row][:, None])[:, 0], atol=1e-5)


def test_save_is_the_inverse_of_load(tiny, tmp_path):
    path = tiny.save(tmp_path / "saved")
    assert path == tmp_path / "saved"
    loaded = sc_c2s.models.load(path)
    assert loaded.metadata.labels == ["B cell", "T cell"]
    assert loaded.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    # a class that transformers 4.x knows as well as 5.x
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    ids = torch.as_tensor([_runtime.tokenize(tiny.tokenizer, ["Cell sentence: CD3D IL7R."])[0]])
    with torch.no_grad():
        np.testing.assert_array_equal(loaded.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits)


@pytest.fixture
def verbosity():
    previous = sc.settings.verbosity
    yield
    sc.settings.verbosity = previous


@pytest.mark.usefixtures("verbosity")
@pytest.mark.parametrize(("level", "shown"), [(0, False), (1, True)], ids=["errors only", "warnings"])
def test_progress_bars_follow_scanpy_verbosity(tiny, capsys, level, shown):
    sc.settings.verbosity = level
    tokenizer = tiny.tokenizer
    ids = _runtime.tokenize(tokenizer, ["Cell sentence: CD3D.", "Cell sentence: LTB NKG7."])
    samples = _trainer.Samples([np.asarray(i) for i in ids], n_prompt=np.array([2, 2]))
    model = build_model(tokenizer, hidden_size=16, n_layers=1, n_heads=2)
    _trainer.train(model, samples, max_steps=1, batch_size=2, learning_rate=1e-3, pad_id=tokenizer.pad_token_id)
    _runtime.run_batches(model, ids, lambda batch: None, batch_size=1, pad_id=tokenizer.pad_token_id, desc="x")
    err = capsys.readouterr().err
    assert ("fine-tuning" in err) == shown
    assert ("x: 100%" in err) == shown


def test_device_and_dtype_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert device_and_dtype(None, None) == (cpu, torch.float32)  # never MPS unless asked for
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert device_and_dtype(None, None) == (torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert device_and_dtype("cuda:1", None) == (torch.device("cuda:1"), torch.float16)
    assert device_and_dtype("cpu", None) == (cpu, torch.float32)
    assert device_and_dtype(cpu, "bfloat16") == (cpu, torch.bfloat16)
    assert device_and_dtype("cpu", torch.float16) == (cpu, torch.float16)
    assert device_and_dtype("cpu", "float64") == (cpu, torch.float64)
    assert device_and_dtype("mps", "float32") == (torch.device("mps"), torch.float32)
    with pytest.raises(ValueError, match=r"MPS has no float64; pass `dtype='float32'`"):
        device_and_dtype("mps", torch.float64)
    for bad in ("int8", "nonsense", torch.int64, torch.float8_e4m3fn, "float8_e5m2", "finfo", [1]):
        with pytest.raises(ValueError, match="floating-point torch dtype"):
            device_and_dtype("cpu", bad)


def test_batch_size_is_checked_before_the_model_loads(pbmc68k):
    """A bad `batch_size` was refused only once the model had loaded: after a download of several GB."""
    sc_c2s.pp.to_sentences(pbmc68k, n_genes=20)
    pbmc68k.obs["condition"] = "control"
    missing = "no-such-checkpoint"  # the model's name is checked when it loads: this error must come first
    calls = [
        lambda b: sc_c2s.tl.annotate(pbmc68k, model=missing, batch_size=b),
        lambda b: sc_c2s.tl.embed(pbmc68k, model=missing, batch_size=b),
        lambda b: sc_c2s.tl.generate(pbmc68k, model=missing, cell_types=["B"], batch_size=b),
        lambda b: sc_c2s.tl.generate(pbmc68k, model=missing, tissues={"lung": 5}, batch_size=b),
        lambda b: sc_c2s.tl.predict_tissue(pbmc68k, model=missing, groupby="bulk_labels", batch_size=b),
        lambda b: sc_c2s.tl.summarize(pbmc68k, model=missing, groupby="bulk_labels", batch_size=b),
        lambda b: sc_c2s.tl.predict_perturbation(
            pbmc68k, model=missing, perturbations=["x"], condition_key="condition", control="control", batch_size=b
        ),
    ]
    for call in calls:
        for bad in (0, -1, 2.5, "4"):
            with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer"):
                call(bad)
        with pytest.raises(ValueError, match=r"is neither a checkpoint directory nor a name from"):
            call(4)
