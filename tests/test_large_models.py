"""Large models on small machines: LoRA adapters, quantised and memory-aware loading, the attention kernel."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

import sc_c2s
from sc_c2s.models import _load, _lora, _memory, _registry, _runtime
from sc_c2s.tl import _finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread", "few_temperature_cells")
N_GENES = 8


@pytest.fixture(scope="module")
def cells(_cellbench):
    """60 CellBench cells with their top 8 genes, and their cell line in `obs["line"]`."""
    adata = _cellbench[::5].copy()
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol", n_genes=N_GENES)
    adata.obs["line"] = adata.obs["cell_type"].astype(str)
    return adata


@pytest.fixture(scope="module")
def bases(cells, builders, tmp_path_factory) -> dict[str, Path]:
    """Tiny random Gemma-2 and Pythia-like base models, saved as published checkpoints are."""
    genes = [g.upper() for g in cells.uns["c2s"]["genes"]]
    labels = sorted(cells.obs["line"].unique())
    gemma = builders.gemma_tokenizer(genes, labels)
    pythia = builders.neox_tokenizer(genes, labels)
    return {
        "gemma2": builders.save_published(builders.gemma2_model(gemma), gemma, tmp_path_factory.mktemp("gemma2")),
        "pythia": builders.save_published(builders.neox_model(pythia), pythia, tmp_path_factory.mktemp("pythia")),
    }


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


@pytest.fixture(scope="module")
def trained(cells, bases, tmp_path_factory):
    """A LoRA adapter trained on the tiny Pythia-like base, and the trained model's annotation of all cells."""
    predictions = {}
    evaluate = _finetune._evaluate

    def evaluate_and_keep(c2s_model, *args, **kwargs):
        scores, temperatures = evaluate(c2s_model, *args, **kwargs)
        c2s_model.metadata.score_temperatures = temperatures  # as finetune records them, calibrating the scores
        adata = cells.copy()
        sc_c2s.tl.annotate(adata, model=c2s_model, labels="model", n_genes=N_GENES)
        predictions["trained"] = adata.obs[["c2s_cell_type", "c2s_cell_type_score"]]
        return scores, temperatures

    mp = pytest.MonkeyPatch()
    mp.setattr(_finetune, "_evaluate", evaluate_and_keep)
    try:
        path = sc_c2s.tl.finetune(
            cells,
            label_key="line",
            base_model=bases["pythia"],
            output_dir=tmp_path_factory.mktemp("lora") / "adapter",
            adapter="lora",
            lora_rank=4,
            n_genes=N_GENES,
            epochs=2,
            patience=None,  # both epochs, whatever the tiny held-out set's label accuracy does
            batch_size=8,
            learning_rate=1e-2,
            device="cpu",
        )
    finally:
        mp.undo()
    return path, predictions["trained"]


def test_lora_adapter_loads_back_and_reproduces_the_trained_model(trained, bases, cells, scanpy_log):
    """The base, a published layout without C2S metadata, loads without a warning that its defaults prompt it: the
    adapter's metadata do."""
    path, expected = trained
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "c2s_metadata.json",
    ]
    assert size(path) < size(bases["pythia"]) / 5

    metadata = sc_c2s.models.C2SMetadata.read(path)
    base = metadata.adapter["base"]
    assert (base["model"], base["path"], base["revision"]) == (bases["pythia"].name, str(bases["pythia"]), None)
    assert base["sha256"] == _load._hash_files(bases["pythia"])
    assert metadata.adapter["target_modules"] == sorted(_lora.DEFAULT_TARGETS["gpt_neox"])
    assert (metadata.adapter["rank"], metadata.training["adapter"]) == (4, "lora")
    assert metadata.training["loss"][-1] < metadata.training["loss"][0]

    for merge in (False, True):
        model = sc_c2s.models.load(path, device="cpu", merge=merge)
        assert _lora.is_adapted(model.model) != merge
        assert model.metadata.labels == sorted(cells.obs["line"].unique())
        assert model.provenance()["base_model"] == base
        adata = cells.copy()
        sc_c2s.tl.annotate(adata, model=model, labels="model", n_genes=N_GENES)
        np.testing.assert_array_equal(adata.obs["c2s_cell_type"], expected["c2s_cell_type"])
        np.testing.assert_allclose(adata.obs["c2s_cell_type_score"], expected["c2s_cell_type_score"], rtol=1e-4)
        sc_c2s.tl.embed(adata, model=model, n_genes=N_GENES)  # the hidden states under the adapter
        assert np.isfinite(adata.obsm["X_c2s"]).all()
    assert "no c2s_metadata.json" not in scanpy_log.getvalue()


def test_loading_keeps_the_callers_random_state(trained, bases, cells, tmp_path):
    """peft draws an adapter's initial weights before it reads the saved ones: loading an adapter, or training from
    one, moved torch's global generator, so the caller's next draw was not the one its own seed gives."""
    path, _ = trained
    loads = [
        lambda: sc_c2s.models.load(bases["pythia"], device="cpu"),
        lambda: sc_c2s.models.load(path, device="cpu", merge=False),
        lambda: sc_c2s.models.load(path, device="cpu", merge=True),
        lambda: sc_c2s.tl.finetune(
            cells[:24],
            label_key="line",
            base_model=path,
            output_dir=tmp_path / "full",
            n_genes=N_GENES,
            max_steps=1,
            eval_fraction=0,
            device="cpu",
        ),
    ]
    for load in loads:
        torch.manual_seed(0)
        expected = torch.rand(3, generator=torch.Generator().manual_seed(0))  # the caller's next draw
        load()
        torch.testing.assert_close(torch.rand(3), expected)


def test_finetune_from_an_adapter(trained, cells, tmp_path, monkeypatch):
    """All weights train from the adapter folded into its base; an adapter on an adapter is refused. Named from the
    home folder (`~/...`), it was not folded in and the trained weights were saved as an adapter of no base."""
    path, _ = trained
    monkeypatch.setenv("HOME", str(path.parent))
    kwargs = {"label_key": "line", "base_model": f"~/{path.name}", "n_genes": N_GENES, "device": "cpu"}
    with pytest.raises(ValueError, match="is itself a LoRA adapter"):
        sc_c2s.tl.finetune(cells, output_dir=tmp_path / "lora", adapter="lora", **kwargs)
    whole = sc_c2s.tl.finetune(cells[:24], output_dir=tmp_path / "whole", epochs=1, eval_fraction=0, **kwargs)
    model = sc_c2s.models.load(whole, device="cpu")
    assert not _lora.is_adapted(model.model)
    assert model.metadata.adapter is None
    assert (whole / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda p: (p / "adapter_model.safetensors").unlink(), r"is incomplete: it has no adapter_model\.safetensors"),
        (lambda p: _truncate(p / "adapter_model.safetensors"), r"adapter_model\.safetensors .* is truncated"),
        (lambda p: (p / "adapter_config.json").write_text("{"), r"adapter_config\.json .* is not valid JSON"),
        (lambda p: (p / "c2s_metadata.json").write_text("{"), r"c2s_metadata\.json .* is not valid JSON"),
    ],
    ids=["no weights", "truncated weights", "config", "metadata"],
)
def test_a_broken_adapter_is_named_before_its_base_loads(trained, tmp_path, monkeypatch, damage, match):
    """They failed in huggingface_hub ("Repo id must be a string"), safetensors or json, after the base had loaded."""
    adapter = shutil.copytree(trained[0], tmp_path / "adapter")
    damage(adapter)
    load = _load._load

    def no_base(*args, adapter_base=False, **kwargs):
        if adapter_base:
            pytest.fail("the base model was loaded")
        return load(*args, adapter_base=adapter_base, **kwargs)

    monkeypatch.setattr(_load, "_load", no_base)  # what loads the adapter, and then its base
    with pytest.raises(sc_c2s.models.BrokenCheckpointError, match=match):
        sc_c2s.models.load(adapter, device="cpu")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_adapter_refuses_a_base_that_changed_or_moved(trained, bases, tmp_path):
    path, _ = trained
    adapter = shutil.copytree(path, tmp_path / "adapter")
    base = shutil.copytree(bases["pythia"], tmp_path / "base")
    metadata = sc_c2s.models.C2SMetadata.read(adapter)
    metadata.adapter["base"]["path"] = str(base)
    metadata.write(adapter)
    assert sc_c2s.models.load(adapter, device="cpu").path == adapter

    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-3}))
    with pytest.raises(ValueError, match=r"not the one the adapter .* trained on: config.json differ\. Train the"):
        sc_c2s.models.load(adapter, device="cpu")
    shutil.rmtree(base)
    with pytest.raises(FileNotFoundError, match="neither in the registry nor at"):
        sc_c2s.models.load(adapter, device="cpu")
    (adapter / "c2s_metadata.json").unlink()
    with pytest.raises(ValueError, match="no c2s_metadata.json naming its base model"):
        sc_c2s.models.load(adapter, device="cpu")


def test_an_adapter_of_another_releases_demo_model_says_so(trained, tmp_path):
    """After an upgrade that retrained the bundled demo, the message named files that differ and no way out."""
    adapter = shutil.copytree(trained[0], tmp_path / "adapter")
    metadata = sc_c2s.models.C2SMetadata.read(adapter)
    metadata.adapter["base"] = {"model": "demo", "path": str(tmp_path / "gone"), "sha256": {"config.json": "0" * 64}}
    metadata.write(adapter)
    with pytest.raises(ValueError, match=r"config.json differ\. The demo model bundled with sc_c2s has changed since"):
        sc_c2s.models.load(adapter, device="cpu")


def test_adapter_on_a_directory_named_like_a_registry_checkpoint(trained, bases, publish, checkpoint_server, tmp_path):
    """A base trained from a directory is read from that directory, although a registry name matches its name."""
    path, _ = trained
    adapter = shutil.copytree(path, tmp_path / "adapter")
    base = shutil.copytree(bases["pythia"], tmp_path / "tiny-gemma2")
    metadata = sc_c2s.models.C2SMetadata.read(adapter)
    metadata.adapter["base"] = {**metadata.adapter["base"], "model": base.name, "path": str(base)}
    metadata.write(adapter)
    publish("tiny-gemma2", bases["gemma2"], architecture="Gemma2ForCausalLM")
    model = sc_c2s.models.load(adapter, device="cpu")
    assert model.model.get_base_model().config.model_type == "gpt_neox"
    assert not checkpoint_server.requests


def test_lora_on_a_registry_base_with_gradient_checkpointing(cells, bases, publish, checkpoint_server, tmp_path):
    """The adapter names the registry checkpoint and its revision; loading it takes the base from the cache."""
    publish("tiny-gemma2", bases["gemma2"], architecture="Gemma2ForCausalLM")
    kwargs = {
        "label_key": "line",
        "base_model": "tiny-gemma2",
        "adapter": "lora",
        "n_genes": N_GENES,
        "epochs": 1,
        "batch_size": 8,
        "eval_fraction": 0,
        "device": "cpu",
    }
    plain = sc_c2s.tl.finetune(cells, output_dir=tmp_path / "plain", **kwargs)
    n_requests = sum(checkpoint_server.requests.values())
    checkpointed = sc_c2s.tl.finetune(
        cells, output_dir=tmp_path / "checkpointed", gradient_checkpointing=True, **kwargs
    )
    assert sum(checkpoint_server.requests.values()) == n_requests  # the base came from the cache

    plain_metadata, metadata = (sc_c2s.models.C2SMetadata.read(p) for p in (plain, checkpointed))
    assert metadata.adapter["base"]["model"] == "tiny-gemma2"
    assert metadata.adapter["base"]["revision"] == "rev1"
    assert metadata.adapter["target_modules"] == sorted(_lora.DEFAULT_TARGETS["gemma2"])
    assert (plain_metadata.training["gradient_checkpointing"], metadata.training["gradient_checkpointing"]) == (
        False,
        True,
    )
    # recomputing activations changes nothing but memory and time (and the rounding of some gradients)
    np.testing.assert_allclose(metadata.training["loss"], plain_metadata.training["loss"], rtol=1e-3)

    model = sc_c2s.models.load(checkpointed, device="cpu")
    assert model.model.get_base_model().config.model_type == "gemma2"
    assert sum(checkpoint_server.requests.values()) == n_requests


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"adapter": "lora", "base_model": "scratch"}, ValueError, "adapts a pretrained model"),
        ({"adapter": "qlora"}, ValueError, '`adapter` must be "lora" or None'),
        ({"quantization": "4bit"}, ValueError, "Quantised weights cannot be trained"),
        ({"adapter": "lora", "quantization": "8bit"}, ValueError, '`quantization` must be "4bit"'),
        ({"adapter": "lora", "lora_rank": 0}, ValueError, "`lora_rank` must be a positive integer"),
        ({"adapter": "lora", "quantization": "4bit"}, ValueError, "runs on a CUDA GPU"),
        # a string was split into its letters: "Target modules {'y', '_', 'q', ...} not found", from peft
        ({"adapter": "lora", "target_modules": "query_key_value"}, ValueError, r"must be a list of module names"),
        ({"adapter": "lora", "target_modules": []}, ValueError, r"must be a list of module names"),
        ({"target_modules": ["dense"]}, ValueError, r'a LoRA adapter adapts; pass `adapter="lora"`'),  # was ignored
    ],
)
def test_finetune_refuses_adapter_settings_that_cannot_train(cells, bases, tmp_path, kwargs, error, match):
    kwargs = {"base_model": bases["pythia"], **kwargs}
    with pytest.raises(error, match=match):
        sc_c2s.tl.finetune(cells, label_key="line", output_dir=tmp_path / "out", device="cpu", **kwargs)
    assert not (tmp_path / "out").exists()


def test_missing_optional_packages_name_the_extra(cells, bases, trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft fails
    with pytest.raises(ImportError, match=r'pip install "sc-c2s\[lora\]"'):
        sc_c2s.tl.finetune(cells, label_key="line", base_model=bases["pythia"], output_dir=tmp_path, adapter="lora")

    def no_base(*args, **kwargs):
        raise AssertionError("the base model was read before peft was found missing")

    monkeypatch.setattr(_runtime, "from_pretrained", no_base)
    with pytest.raises(ImportError, match=r'pip install "sc-c2s\[lora\]"'):
        sc_c2s.models.load(trained[0], device="cpu")

    gpu(monkeypatch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r'pip install "sc-c2s\[quantization\]"'):
        sc_c2s.models.load(bases["pythia"], device="cuda", quantization="4bit")
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    with pytest.raises(ImportError, match="pip install flash-attn"):
        sc_c2s.models.load(bases["pythia"], device="cuda", attn_implementation="flash_attention_2")


def gpu(monkeypatch, free_gib: float = 80):
    """Pretend there is a CUDA GPU with bfloat16 and `free_gib` GiB free (nothing may run on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(_memory, "capacity", lambda device: int(free_gib * 2**30) if device.type == "cuda" else None)


def test_load_options_are_checked(bases):
    with pytest.raises(ValueError, match=r"runs on a CUDA GPU \(bitsandbytes\), not on cpu.*sc-c2s\[quantization\]"):
        sc_c2s.models.load(bases["pythia"], device="cpu", quantization="4bit")
    with pytest.raises(ValueError, match="must be None, '8bit' or '4bit'"):
        sc_c2s.models.load(bases["pythia"], device="cpu", quantization="int4")
    with pytest.raises(ValueError, match="FlashAttention-2 runs on a CUDA GPU in bfloat16 or float16, not on cpu"):
        sc_c2s.models.load(bases["pythia"], device="cpu", attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="`attn_implementation` must be None or one of"):
        sc_c2s.models.load(bases["pythia"], device="cpu", attn_implementation="flex")
    with pytest.raises(ValueError, match="`merge` must be True or False, got 'no'"):
        sc_c2s.models.load(bases["pythia"], device="cpu", merge="no")


def test_attention_kernels(bases):
    """SDPA by default where the model has it; Gemma 2 soft-caps attention logits, which SDPA cannot do."""
    assert sc_c2s.models.load(bases["pythia"], device="cpu").model.config._attn_implementation == "sdpa"
    eager = sc_c2s.models.load(bases["pythia"], device="cpu", attn_implementation="eager")
    assert eager.model.config._attn_implementation == "eager"
    gemma = sc_c2s.models.load(bases["gemma2"], device="cpu")
    assert gemma.model.config._attn_implementation == "eager"
    assert gemma.model.config.attn_logit_softcapping == 50.0
    with pytest.raises(ValueError, match="Gemma 2 soft-caps its attention logits, which SDPA cannot do"):
        sc_c2s.models.load(bases["gemma2"], device="cpu", attn_implementation="sdpa")


def test_gemma_never_loads_in_float16_by_default(bases):
    """On a GPU without bfloat16 the default would be float16, in which Gemma's activations overflow."""
    options = _load._Options(torch.device("cpu"), torch.float16, None, None, False, dtype_given=False)
    assert options.for_model(bases["gemma2"]).dtype == torch.float32
    assert options.for_model(bases["pythia"]).dtype == torch.float16
    given = _load._Options(torch.device("cpu"), torch.float16, None, None, False, dtype_given=True)
    assert given.for_model(bases["gemma2"]).dtype == torch.float16


def test_memory_check_judges_gemma_in_float32_where_it_will_load_so(monkeypatch, cache, checkpoint_server):
    """On a GPU without bfloat16, Gemma loads in float32 (not float16): the check before the download says so."""
    gpu(monkeypatch, free_gib=8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(MemoryError, match=r"C2S-Scale-Gemma-2-2B needs at least \d+\.\d GiB on cuda in float32"):
        sc_c2s.models.load("C2S-Scale-Gemma-2-2B", device="cuda")
    assert not checkpoint_server.requests


@pytest.mark.parametrize("base", ["EleutherAI/pythia-410m", "google/gemma-2-2b", "tiny-gemma2", "tiny-pythia"])
def test_parameter_count_from_the_configuration(base, bases):
    if base.startswith("tiny"):
        config = json.loads((bases[base.removeprefix("tiny-")] / "config.json").read_text())
    else:
        config = _memory.ARCHITECTURES[base]
    kwargs = {k: v for k, v in config.items() if k not in {"model_type", "architectures", "transformers_version"}}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[config["model_type"]](**kwargs))
    shape = _memory.shape(config)
    assert shape.n_parameters == sum(p.numel() for p in model.parameters())
    linear = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    assert shape.n_linear == sum(m.weight.numel() for m in linear)
    lora_targets = set(_lora.DEFAULT_TARGETS[config["model_type"]])
    adapted = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in lora_targets]
    assert shape.n_lora == sum(_memory.LORA_RANK * (m.in_features + m.out_features) for m in adapted)


def test_available_shows_what_each_checkpoint_needs():
    zoo = sc_c2s.models.available()
    columns = ["parameters", "inference_bf16_gib", "inference_8bit_gib", "inference_4bit_gib", "lora_gib", "qlora_gib"]
    needs = zoo.loc[zoo.index != "demo", columns]
    assert needs.notna().all().all()
    assert needs.loc["C2S-Scale-Gemma-2-27B", "parameters"] == 27.2
    assert needs.loc["C2S-Scale-Gemma-2-2B", "parameters"] == 2.6
    assert (needs["inference_bf16_gib"] > needs["inference_8bit_gib"]).all()
    assert (needs["inference_8bit_gib"] >= needs["inference_4bit_gib"]).all()
    assert (needs["lora_gib"] > needs["inference_bf16_gib"]).all()
    # what fits where: the 27B model needs a large GPU in bfloat16, a 24 GB one in 4-bit, 48 GB for QLoRA
    gemma27 = needs.loc["C2S-Scale-Gemma-2-27B"]
    assert gemma27["inference_bf16_gib"] > 48
    assert gemma27["inference_4bit_gib"] < 24
    assert 24 < gemma27["qlora_gib"] < 48
    assert needs.loc["C2S-Scale-Gemma-2-2B", "lora_gib"] < 24


def test_load_refuses_what_the_device_cannot_hold_before_downloading(monkeypatch, cache, checkpoint_server):
    gpu(monkeypatch, free_gib=23.5)
    with pytest.raises(MemoryError, match=r"C2S-Scale-Gemma-2-27B needs at least 5\d\.\d GiB on cuda in bfloat16") as e:
        sc_c2s.models.load("C2S-Scale-Gemma-2-27B", device="cuda")
    assert "Load it in 4-bit (`quantization='4bit'`, about 16 GiB)" in str(e.value)
    assert "23.5 GiB are free" in str(e.value)
    assert not checkpoint_server.requests  # nothing downloaded
    assert not cache.exists()

    monkeypatch.setattr(_memory, "capacity", lambda device: 2**30)
    for keep in (None, "0", "false"):  # "0" turned the check off
        if keep is not None:
            monkeypatch.setenv("SC_C2S_SKIP_MEMORY_CHECK", keep)
        with pytest.raises(MemoryError, match="needs at least .* on cpu in float32"):
            sc_c2s.models.load("C2S-Scale-Gemma-2-2B", device="cpu")
    monkeypatch.setenv("SC_C2S_SKIP_MEMORY_CHECK", "1")
    with pytest.raises(ConnectionError):  # checked no more: the download starts (and fails, it is not served)
        sc_c2s.models.load("C2S-Scale-Gemma-2-2B", device="cpu")


def test_a_gpu_too_full_to_start_cuda_is_named(monkeypatch):
    def failing(message):
        def mem_get_info(device):
            raise RuntimeError(message)

        return mem_get_info

    monkeypatch.setattr(torch.cuda, "mem_get_info", failing("CUDA error: out of memory\nSearch for ..."))
    with pytest.raises(MemoryError, match=r"CUDA cannot start on cuda:0: its memory is full.*empty_cache"):
        _memory.capacity(torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", failing("no driver"))
    with pytest.raises(RuntimeError, match="^no driver$"):  # other CUDA errors pass as they are
        _memory.capacity(torch.device("cuda:0"))


def test_load_refuses_a_directory_too_large(bases, monkeypatch):
    monkeypatch.setattr(_memory, "capacity", lambda device: 1000)
    with pytest.raises(MemoryError, match="but 0.0 GiB are free. Free memory or use a device with more"):
        sc_c2s.models.load(bases["pythia"], device="cpu")


def test_default_lora_targets():
    class Config:
        model_type = "mamba"

    assert _lora.default_targets(type("M", (), {"config": Config()})()) == "all-linear"
    assert _registry.lookup("C2S-Scale-Gemma-2-27B").base_model in _memory.ARCHITECTURES


@pytest.fixture
def memory_sized(monkeypatch):
    """Batches sized to a pretend GPU's free memory (`sizes` records each batch), on the CPU."""
    monkeypatch.setattr(_runtime, "sizes_to_memory", lambda device: True)
    monkeypatch.setattr(_runtime, "free_memory", lambda device: 2**20)
    return monkeypatch


def out_of_memory_above(monkeypatch, function_name: str, n_rows: int, sizes: list[int]):
    """Make `_runtime.{function_name}` run out of memory for batches of more than `n_rows` rows."""
    function = getattr(_runtime, function_name)

    def limited(model, batch_or_ids, *args, **kwargs):
        rows = len(batch_or_ids.index) if isinstance(batch_or_ids, _runtime.Batch) else len(batch_or_ids)
        sizes.append(rows)
        if rows > n_rows:
            raise torch.OutOfMemoryError("CUDA out of memory (pretend)")
        return function(model, batch_or_ids, *args, **kwargs)

    monkeypatch.setattr(_runtime, function_name, limited)


def test_batches_sized_to_memory_shrink_with_length_and_halve_when_out_of_memory(bases, memory_sized, scanpy_log):
    c2s = sc_c2s.models.load(bases["pythia"], device="cpu")
    assert _runtime.sequence_bytes(c2s.model, 200) > _runtime.sequence_bytes(c2s.model, 100)  # longer: fewer cells
    ids = [[5] * n for n in (12, 40, 40, 12, 12, 12, 12, 12, 12, 12, 3, 3, 3, 3, 3, 3)]
    free = _runtime.MEMORY_SHARE * 2**20
    expected_first = int(free // _runtime.sequence_bytes(c2s.model, 40))
    assert 1 < expected_first < len(ids)
    done, sizes = [], []

    def work(batch):
        sizes.append(len(batch.index))
        if len(batch.index) > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (pretend)")
        done.extend(batch.index.tolist())

    _runtime.run_batches(c2s.model, ids, work, batch_size=None, pad_id=0, desc="")
    assert sorted(done) == list(range(len(ids)))  # every cell once: none lost, none twice
    assert sizes[0] == expected_first
    first = next(i for i, size in enumerate(sizes) if size > 5)  # out of memory: halve, and never grow again
    assert all(size <= sizes[first] // 2 for size in sizes[first + 1 :])
    assert scanpy_log.getvalue().count("out of GPU memory") == 1

    one = [len(b.index) for b in collect(c2s.model, ids, batch_size=1)]
    assert one == [1] * len(ids)


def collect(model, ids, **kwargs) -> list[_runtime.Batch]:
    out = []
    _runtime.run_batches(model, ids, out.append, pad_id=0, desc="", **kwargs)
    return out


@pytest.mark.parametrize("architecture", ["gemma2", "pythia"])
def test_verbs_finish_every_cell_when_out_of_memory(bases, cells, memory_sized, architecture):
    """Annotation (free and constrained), embedding and generation give the results of one cell at a time."""
    c2s = sc_c2s.models.load(bases[architecture], device="cpu")
    adata = cells[:10].copy()
    labels = sorted(cells.obs["line"].unique())
    one = adata.copy()
    sc_c2s.tl.annotate(one, model=c2s, labels=labels, n_genes=N_GENES, batch_size=1)
    sc_c2s.tl.embed(one, model=c2s, n_genes=N_GENES, batch_size=1)
    generated_one = sc_c2s.tl.generate(one, model=c2s, cell_types=labels, n_genes=4, batch_size=1)

    sizes: list[int] = []
    out_of_memory_above(memory_sized, "forward", 3, sizes)
    out_of_memory_above(memory_sized, "mean_hidden_state", 3, sizes)
    sc_c2s.tl.annotate(adata, model=c2s, labels=labels, n_genes=N_GENES)
    sc_c2s.tl.embed(adata, model=c2s, n_genes=N_GENES)
    generated = sc_c2s.tl.generate(adata, model=c2s, cell_types=labels, n_genes=4)
    assert max(sizes) > 3  # it did run out, and went on
    np.testing.assert_array_equal(adata.obs["c2s_cell_type"], one.obs["c2s_cell_type"])
    np.testing.assert_allclose(adata.obs["c2s_cell_type_score"], one.obs["c2s_cell_type_score"], rtol=1e-4)
    np.testing.assert_allclose(adata.obsm["X_c2s"], one.obsm["X_c2s"], atol=1e-5)
    assert generated.obs["c2s_sentence"].tolist() == generated_one.obs["c2s_sentence"].tolist()


def test_finetune_is_seeded_and_keeps_the_callers_random_state(cells, bases, tmp_path, monkeypatch):
    """An adapter's initial weights came from torch's unseeded generator: a `random_state` gave another adapter in
    every process; and finetune left torch's global generator seeded with `random_state`, and seeded CUDA's and
    MPS's for good."""
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(("cuda", seed)))
    monkeypatch.setattr(torch.mps, "manual_seed", lambda seed: seeded.append(("mps", seed)))
    kwargs = {"label_key": "line", "base_model": bases["pythia"], "adapter": "lora", "lora_rank": 2, "n_genes": N_GENES}
    kwargs |= {"max_steps": 1, "eval_fraction": 0, "device": "cpu", "random_state": 3}
    weights = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected = torch.rand(3, generator=torch.Generator().manual_seed(seed))  # the caller's next draw
        path = sc_c2s.tl.finetune(cells[:24], output_dir=tmp_path / str(seed), **kwargs)
        torch.testing.assert_close(torch.rand(3), expected)
        assert seeded == [("cuda", seed), ("mps", seed)]  # the caller's own seeding only
        seeded.clear()
        weights.append(load_file(path / _lora.ADAPTER_WEIGHTS))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0)
