"""Device check: the architectures of the published C2S checkpoints, at their real size, with random weights.

For Pythia-410m, Pythia-1b and Gemma-2-2B (and Gemma-2-27B in 4-bit where bitsandbytes is installed and the GPU
has room), in bfloat16 on one CUDA GPU, this prints: the time ``sc_c2s.models.load`` takes to open a saved
checkpoint, the peak GPU memory, annotation cells/s (constrained to the 5 CellBench cell lines, and free),
embedding cells/s, generation cells/s (200 genes, distinct, exact length), LoRA training tokens/s, and full
fine-tuning tokens/s as ``tl.finetune`` trains (float32 weights, bf16 autocast, AdamW; activation checkpointing
from 1B parameters) at the largest batch that fits, found by doubling the batch from 8 until one runs out of
memory. Then it exercises the paths that need a GPU: ``tl.finetune`` end to end on this GPU (cell-type prediction
and generation on the CellBench cells, with held-out selection and the choice of temperature; and the
perturbation task on the Kang cells of ``tests/data/kang_400.h5ad``, followed by ``tl.predict_perturbation`` of
their control cells), each for a few steps and with its training tokens/s and the predicted cells/s;
``load(..., quantization="8bit" | "4bit")`` through bitsandbytes and ``attn_implementation="flash_attention_2"``
(each where its package is installed); ``tl.annotate`` on a one-worker Dask ``LocalCluster`` that loads the model
onto its own GPU (where ``distributed`` is installed), against the same call in this process; and that the
packed scoring of candidates under a 4-D mask gives the scores of one candidate at a time on this GPU, with the
cells/s of both (one candidate at a time is the baseline of the constrained annotation's cells/s; for the other
speeds, ``bench_annotate.py`` and ``bench_generation.py`` run their loop baselines on a GPU too).

Prompts: the 300 CellBench cells of ``tests/data/cellbench_300.h5ad`` (repeated as needed), their top 200 genes.
The tokenizer is a byte-level BPE trained on the gene names and the templates, as Pythia's splits genes into a
few tokens each (``--tokenizer word`` takes one token per gene instead); its vocabulary is padded to the
architecture's (50,304 or 256,000), so the output layer costs what it costs in the published models. Targets on
one H100/H200-class GPU for the 410m architecture: ≥ 500 annotated cells/s, ≥ 200 generated cells/s.

Last run, one NVIDIA H200 (torch 2.11, transformers 5.17, bitsandbytes 0.50.2; 591 tokens per 200-gene prompt),
``--only EleutherAI/pythia-410m`` then ``--only google/gemma-2-2b``: Pythia-410m annotated 304 cells/s constrained
and 129 free, embedded 333 and generated 15.1 cells/s (4,096 and 1,024 cells; with ``--quick``'s 512 and 128
cells: 249, 92, 311 and 5.1), trained a LoRA adapter at 7,429 tokens/s, and fine-tuned fully at 34,191 tokens/s
with batches of 8, 64,253 of 32, 93,724 of 64 and 102,208 of 128, the largest that fits (peak 117 GiB; 256 ran
out of memory). Gemma-2-2B annotated 86.5 cells/s constrained and 52.5 free, embedded 106.2 and generated 11.6
cells/s. Both targets are missed, generation by far: a cell is ~500 decoding steps (200 genes of ~2.4 tokens), and
the 128 cells of ``--quick``, one batch, took 25 s, ~50 ms a step. The run stopped at its time limit before the
end-to-end checks of the 410m model, and the Dask check of the 2B model failed: its worker found no GPU memory
left to start CUDA (this process's allocator held it; the check now empties that cache first).

One architecture per command fits a device command of 10 minutes (``--only``); ``--quick`` measures an eighth
of the cells and full fine-tuning at batch 8 only. ``--smoke`` runs tiny models of the same architectures (but
the real vocabularies) on the CPU with 20-gene prompts, to check the script itself: 15 to 20 minutes on 2
cores, most of it in the two Gemma models' 256k-token output layers (``--only`` shortens it).

    python benchmarks/bench_large_models.py            # on a GPU
    python benchmarks/bench_large_models.py --smoke    # anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import torch
import transformers

import sc_c2s
from sc_c2s import prompts
from sc_c2s.models import C2SMetadata, C2SModel, _lora, _memory, _runtime, _trainer
from sc_c2s.tl import _annotate, _samples

CELLS = Path(__file__).parents[1] / "tests" / "data" / "cellbench_300.h5ad"
KANG = Path(__file__).parents[1] / "tests" / "data" / "kang_400.h5ad"
N_GENES = 200
#: Full fine-tuning: batch sizes tried in turn until one does not fit, and optimiser steps timed at each.
FINETUNE_BATCHES = (8, 16, 32, 64, 128, 256, 512, 1024)
FINETUNE_STEPS = 3
#: Optimiser steps of the end-to-end ``tl.finetune`` runs (a path check, not a trained model).
END_TO_END_STEPS = 20
#: Architecture, cells to annotate and embed, cells to generate, LoRA steps (batches of 8).
PLAN = [
    ("EleutherAI/pythia-410m", 4096, 1024, 20),
    ("EleutherAI/pythia-1b", 2048, 512, 20),
    ("google/gemma-2-2b", 1024, 256, 10),
    ("google/gemma-2-27b", 128, 32, 4),
]
#: Tiny stand-ins for --smoke: same model types, a few layers.
SMOKE = {
    "gpt_neox": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
    "gemma2": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "query_pre_attn_scalar": 16,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, to check the script")
    parser.add_argument(
        "--tokenizer", choices=["bpe", "word"], default="bpe", help="sub-word BPE as Pythia's, or one token per gene"
    )
    parser.add_argument(
        "--only", nargs="*", choices=[base for base, *_ in PLAN], help="architectures to run (default: all)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="an eighth of the cells, and full fine-tuning at batch 8 only"
    )
    args = parser.parse_args()
    sc.settings.verbosity = 0
    global N_GENES
    N_GENES = 20 if args.smoke else N_GENES
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU: run with --smoke to check the script on the CPU.")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    print(
        f"sc_c2s {sc_c2s.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}; "
        + (torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)")
        + "; "
        + ", ".join(f"{m} {'yes' if installed(m) else 'no'}" for m in ("peft", "bitsandbytes", "flash_attn"))
    )
    cells = load_cells(max(n for _, n, _, _ in PLAN))
    kang = ad.read_h5ad(KANG)
    sc_c2s.pp.to_sentences(kang, n_genes=N_GENES, sentences=False)
    labels = sorted(cells.obs["cell_type"].unique())
    rows, checks = [], []
    work = Path(tempfile.mkdtemp(prefix="sc_c2s_bench_"))
    try:
        for base, n_cells, n_generate, n_steps in PLAN:
            if args.only and base not in args.only:
                continue
            if args.smoke:
                n_cells, n_generate, n_steps = 16, 4, 2
            elif args.quick:
                n_cells, n_generate = n_cells // 8, n_generate // 8
            config = dict(_memory.ARCHITECTURES[base]) | (
                SMOKE[_memory.ARCHITECTURES[base]["model_type"]] if args.smoke else {}
            )
            row = {"model": base.split("/")[1] + (" (smoke)" if args.smoke else "")}
            try:
                c2s, row["load s"], quantized = build(base, config, cells, kang, labels, args, device, dtype, work)
            except SkipError as reason:
                print(f"\n{base}: skipped ({reason})")
                continue
            if quantized:
                row["model"] += " 4-bit"
            print(f"\n{c2s!r}: {prompt_tokens(c2s, cells):.0f} tokens per {N_GENES}-gene prompt")
            row |= measure(c2s, cells, labels, n_cells=n_cells, n_generate=n_generate)
            path = None if quantized else work / base.split("/")[1]  # the checkpoint `build` saved
            checks += gpu_paths(base, c2s, cells, labels, path, device, dask=not rows)
            row["LoRA tokens/s"] = lora_rate(c2s, cells, n_steps=n_steps)  # adds the adapter to c2s.model
            print(f"  {'LoRA tokens/s':22s} {row['LoRA tokens/s']:9.0f}")
            del c2s
            free(device)
            if path is not None:
                batches = (
                    FINETUNE_BATCHES[:2] if args.smoke else FINETUNE_BATCHES[:1] if args.quick else FINETUNE_BATCHES
                )
                row["full FT batch"], row["full FT tokens/s"] = full_finetuning(path, cells, device, batches=batches)
                checks += end_to_end(path, cells, kang, device, n_steps=2 if args.smoke else END_TO_END_STEPS)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + table(rows))
    if checks:
        print("\n" + "\n".join(checks))


class SkipError(Exception):
    """A model this machine cannot run."""


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def load_cells(n_cells: int) -> ad.AnnData:
    """`n_cells` CellBench cells (the 300 repeated), ranked by their upper-cased gene symbols."""
    adata = ad.read_h5ad(CELLS)
    adata.var_names = adata.var["gene_symbol"].str.upper()
    adata.var_names_make_unique()
    repeat = np.arange(n_cells) % adata.n_obs
    obs = adata.obs.iloc[repeat].set_axis([f"cell{i}" for i in range(n_cells)])
    adata = ad.AnnData(adata.X[repeat], obs=obs, var=adata.var[[]])
    sc_c2s.pp.to_sentences(adata, n_genes=N_GENES, sentences=False)
    return adata


def tokenizer_for(genes: list[str], labels: list[str], *, kind: str, vocab_size: int):
    """A tokenizer over the genes and templates, its vocabulary padded with unused tokens to `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sc_c2s.models._scratch import build_tokenizer

    if kind == "word":
        backend = build_tokenizer(genes, labels, max_genes=N_GENES).backend_tokenizer
        special = {"pad_token": "[PAD]", "unk_token": "[UNK]", "eos_token": "[EOS]"}
    else:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        text = [prompts.CELL_TYPE_PREDICTION, prompts.CELL_TYPE_GENERATION, prompts.PERTURBATION, " ".join(genes)]
        text += labels
        trainer = trainers.BpeTrainer(
            vocab_size=4000,
            special_tokens=["<|endoftext|>", "<|padding|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(text, trainer)
        special = {"pad_token": "<|padding|>", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<|unused{i}|>"] = i
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), padding_side="left", model_max_length=8192, **special
    )


def build(base, config, cells, kang, labels, args, device, dtype, work) -> tuple[C2SModel, float | None, bool]:
    """A random model of `config` with its tokenizer: saved and loaded with sc_c2s (timed), or built in place."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    genes = list(dict.fromkeys([*cells.uns["c2s"]["genes"], *kang.uns["c2s"]["genes"]]))
    tokenizer = tokenizer_for(genes, labels, kind=args.tokenizer, vocab_size=config["vocab_size"])
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    hf_config = CONFIG_MAPPING[config["model_type"]](**kwargs, **ids)
    shape = _memory.shape(config)
    metadata = C2SMetadata(name=base.split("/")[1], labels=labels)
    big = shape.n_parameters > 1e10
    if big:  # 27B: quantised in place on the GPU, not saved (54 GB)
        if device.type != "cuda" or not installed("bitsandbytes"):
            raise SkipError("needs a GPU and bitsandbytes")
        room, needed = _runtime.free_memory(device) / 2**30, _memory.weights(shape) / 2**30 + 8
        if room < needed:
            raise SkipError(f"building it in bfloat16 before quantising needs ~{needed:.0f} GiB, {room:.0f} free")
    start = time.perf_counter()
    torch.manual_seed(0)
    with device if big else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    if big:
        quantize_4bit(model, dtype)
        _runtime.prepare_tokenizer(tokenizer, model, Path(base))
        return C2SModel(model, tokenizer, metadata, Path(base)), None, True
    path = work / metadata.name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    metadata.write(path)
    del model
    free(device)
    sync(device)
    start = time.perf_counter()
    c2s = sc_c2s.models.load(path, device=device, dtype=dtype)
    sync(device)
    return c2s, time.perf_counter() - start, False


def quantize_4bit(model, dtype) -> None:
    """Replace every linear layer of the decoder by a bitsandbytes NF4 layer, quantising its weights on the GPU."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=dtype,
                    quant_type="nf4",
                    device="meta",
                )
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4").to("cuda")
                if child.bias is not None:
                    layer.bias = child.bias
                setattr(module, name, layer)
                del child
    torch.cuda.empty_cache()


def prompt_tokens(c2s: C2SModel, cells: ad.AnnData) -> float:
    texts = prompts.cell_type_prediction_prompts(cells[:20], n_genes=N_GENES)
    return float(np.mean([len(i) for i in _runtime.tokenize(c2s.tokenizer, texts)]))


def measure(c2s, cells, labels, *, n_cells: int, n_generate: int) -> dict[str, float]:
    """Peak memory and the rates of annotation, embedding and generation."""
    device = c2s.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {}
    calls: list[tuple[str, int, Callable[[ad.AnnData], object]]] = [
        ("constrained cells/s", n_cells, lambda a: sc_c2s.tl.annotate(a, model=c2s, labels=labels)),
        ("free cells/s", n_cells, lambda a: sc_c2s.tl.annotate(a, model=c2s)),
        ("embed cells/s", n_cells, lambda a: sc_c2s.tl.embed(a, model=c2s)),
        (
            "generate cells/s",
            n_generate,
            lambda a: sc_c2s.tl.generate(a, model=c2s, cell_types={labels[0]: a.n_obs}, n_genes=N_GENES),
        ),
    ]
    for name, n, call in calls:
        call(cells[: min(8, n)].copy())  # warm-up
        subset = cells[:n].copy()
        with timed(device) as seconds:
            call(subset)
        row[name] = n / seconds()
        print(f"  {name:22s} {row[name]:9.1f}  ({n} cells, {seconds():.1f} s)")
    if device.type == "cuda":
        row["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def training_samples(c2s: C2SModel, cells: ad.AnnData, n_cells: int) -> _trainer.Samples:
    """Samples of both cell-type tasks for the first `n_cells` cells (the cells repeated as needed)."""
    cells = cells[np.arange(n_cells) % cells.n_obs]
    return _samples.encode(
        c2s.tokenizer,
        prompts.sentence_words(cells, n_genes=N_GENES),
        cells.obs["cell_type"].astype(str).tolist(),
        tasks=("cell_type_prediction", "cell_type_generation"),
        organism="Homo sapiens",
        upper=True,
        max_length=4096,
    )


def lora_rate(c2s: C2SModel, cells: ad.AnnData, *, n_steps: int) -> float:
    """Tokens per second of LoRA training (rank 16, both tasks, batches of 8), or NaN without peft."""
    if not installed("peft"):
        print("  LoRA: skipped, peft is not installed")
        return float("nan")
    big = sum(p.numel() for p in c2s.model.parameters()) >= _lora.CHECKPOINTING_FROM
    quantized = any(type(m).__name__ == "Linear4bit" for m in c2s.model.modules())
    model = _lora.add_lora(
        c2s.model, rank=16, target_modules=None, gradient_checkpointing=big, quantized=quantized, seed=0
    )
    samples = training_samples(c2s, cells, n_steps * 4)
    with timed(c2s.device) as seconds:
        result = _trainer.train(
            model, samples, max_steps=n_steps, batch_size=8, learning_rate=1e-4, pad_id=_runtime.pad_id(c2s.tokenizer)
        )
    return result.n_tokens / seconds()


def full_finetuning(
    path: Path, cells: ad.AnnData, device: torch.device, *, batches: Sequence[int]
) -> tuple[int, float]:
    """The largest batch of `batches` that fits for full fine-tuning, and its training tokens per second.

    As ``tl.finetune`` trains: float32 weights, bf16 autocast on a GPU, AdamW, activation checkpointing from
    :data:`~sc_c2s.models._lora.CHECKPOINTING_FROM` parameters. Each batch size runs one step, then
    :data:`FINETUNE_STEPS` timed steps; the first that runs out of memory ends the search.
    """
    from sc_c2s._compat import enable_activation_checkpointing

    c2s = sc_c2s.models.load(path, device=device, dtype=torch.float32)
    if sum(p.numel() for p in c2s.model.parameters()) >= _lora.CHECKPOINTING_FROM:
        enable_activation_checkpointing(c2s.model)
    train = partial(_trainer.train, c2s.model, learning_rate=5e-5, pad_id=_runtime.pad_id(c2s.tokenizer))
    fits, rate = 0, float("nan")
    for batch_size in batches:
        samples = training_samples(c2s, cells, batch_size * (FINETUNE_STEPS + 1) // 2)  # two tasks: 2 per cell
        first, rest = (
            _trainer.Samples(samples.input_ids[:batch_size], samples.n_prompt[:batch_size]),
            _trainer.Samples(samples.input_ids[batch_size:], samples.n_prompt[batch_size:]),
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            train(first, max_steps=1, batch_size=batch_size)
            with timed(device) as seconds:
                result = train(rest, max_steps=FINETUNE_STEPS, batch_size=batch_size)
        except RuntimeError as error:  # out of memory: torch.OutOfMemoryError, or cuBLAS failing to allocate
            failure = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        else:
            failure = None
        if failure is not None:
            c2s.model.zero_grad(set_to_none=True)
            free(device)
            print(f"  full fine-tuning, batch {batch_size:4d}: {failure}")
            break
        fits, rate = batch_size, result.n_tokens / seconds()
        peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(
            f"  full fine-tuning, batch {batch_size:4d}: {rate:9.0f} tokens/s "
            f"({result.n_tokens / FINETUNE_STEPS / batch_size:.0f} tokens per sample{peak})"
        )
    del c2s, train
    free(device)
    return fits, rate


def end_to_end(path: Path, cells: ad.AnnData, kang: ad.AnnData, device: torch.device, *, n_steps: int) -> list[str]:
    """``tl.finetune`` from the checkpoint at `path` on `device` for `n_steps`: both cell-type tasks, then perturbation.

    The cell-type run holds cells out (selection, annotation of the held-out cells, the choice of temperature); the
    perturbation run is followed by ``tl.predict_perturbation`` of the Kang control cells.
    """
    runs = {
        "cell types": (cells[:300].copy(), {"label_key": "cell_type"}),
        "perturbation": (
            kang,
            {"tasks": ["perturbation"], "condition_key": "condition", "control": "control", "pair_by": "cell_type"},
        ),
    }
    lines = []
    for name, (adata, kwargs) in runs.items():
        free(device)
        head = f"{path.name}: tl.finetune ({name}, {n_steps} steps)"
        try:
            with timed(device) as seconds:
                out = sc_c2s.tl.finetune(
                    adata,
                    base_model=path,
                    output_dir=path.parent / f"{path.name}-{name.replace(' ', '-')}",
                    n_genes=N_GENES,
                    max_steps=n_steps,
                    device=device,
                    **kwargs,
                )
            model = sc_c2s.models.load(out, device=device)
            training = model.metadata.training
            line = (
                f"{head}: batch {training['batch_size']}, {training['n_tokens'] / training['train_seconds']:,.0f} "
                f"training tokens/s, {seconds():.0f} s in all"
            )
            if name == "perturbation":
                control = adata[adata.obs["condition"] == "control"].copy()
                with timed(device) as predict_seconds:
                    predicted = sc_c2s.tl.predict_perturbation(
                        control,
                        model=model,
                        perturbations=["stimulated"],
                        condition_key="condition",
                        control="control",
                        groupby="cell_type",
                        n_genes=N_GENES,
                    )
                rate = predicted.n_obs / predict_seconds()
                line += f"; predict_perturbation {rate:.1f} cells/s ({predicted.n_obs} cells)"
            else:
                line += f"; held out {model.metadata.scores}, temperature {model.metadata.temperature}"
            del model
        except Exception as error:  # noqa: BLE001 - a device check reports what failed and goes on
            line = f"{head}: FAILED {type(error).__name__}: {error}"
        print(line, flush=True)
        lines.append(line)
    return lines


def gpu_paths(base, c2s, cells, labels, path, device, *, dask: bool) -> list[str]:
    """Packed against one-at-a-time candidate scores; quantised loading and FlashAttention-2 where installed.

    With `dask`, also annotation on a one-worker Dask cluster (once: the path does not depend on the architecture).
    """
    lines = []
    subset = cells[:16].copy()
    words = prompts.sentence_words(subset, n_genes=N_GENES)
    ids = _runtime.tokenize(c2s.tokenizer, [prompts.cell_type_prediction(w) for w in words])
    with _runtime.inference(c2s.model):
        with timed(device) as packed_seconds:
            packed = _annotate.score_labels(c2s, ids, labels, batch_size=8)
        with one_at_a_time(), timed(device) as single_seconds:  # the baseline of the constrained cells/s
            single = _annotate.score_labels(c2s, ids, labels, batch_size=8)
    lines.append(
        f"{base}: packed vs one-at-a-time candidate log-likelihoods, max |Δ| = {np.abs(packed - single).max():.3g}; "
        f"{len(ids) / packed_seconds():.1f} against {len(ids) / single_seconds():.1f} cells/s ({len(ids)} cells)"
    )
    print(lines[-1], flush=True)
    if dask and path is not None and installed("distributed"):
        free(device)  # the worker shares this GPU: leave it room for its context and model
        lines.append(on_dask(c2s, subset, labels))
        print(lines[-1], flush=True)
    if device.type != "cuda" or path is None:
        return lines
    options = [{"quantization": q} for q in ("8bit", "4bit") if installed("bitsandbytes")]
    options += [{"attn_implementation": "flash_attention_2"}] if installed("flash_attn") else []
    for option in options:
        free(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with timed(device) as load_seconds:
                model = sc_c2s.models.load(path, device=device, **option)
            with timed(device) as seconds:
                sc_c2s.tl.annotate(subset, model=model, labels=labels)
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            agree = (subset.obs["c2s_cell_type"].to_numpy() == np.asarray(labels)[packed.argmax(1)]).mean()
            lines.append(
                f"{base} {option}: loaded in {load_seconds():.1f} s, peak {peak:.2f} GiB, constrained "
                f"{len(subset) / seconds():.0f} cells/s, same label as bfloat16 for {agree:.0%} of 16 cells"
            )
            del model
        except Exception as error:  # noqa: BLE001 - a device check reports what failed and goes on
            lines.append(f"{base} {option}: FAILED {type(error).__name__}: {error}")
        print(lines[-1], flush=True)
    return lines


def on_dask(c2s: C2SModel, cells: ad.AnnData, labels: list[str]) -> str:
    """Constrained annotation on a one-worker ``LocalCluster`` (its own process and device) against this process."""
    from distributed import Client, LocalCluster

    here, there = cells.copy(), cells.copy()
    sc_c2s.tl.annotate(here, model=c2s, labels=labels)
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        sc_c2s.tl.annotate(there, model=c2s, labels=labels, client=client)
        devices = client.run(lambda: sorted({str(m.device) for m in sc_c2s._dask._MODELS.values()}))
    same = (here.obs["c2s_cell_type"] == there.obs["c2s_cell_type"]).mean()
    score = np.abs(here.obs["c2s_cell_type_score"] - there.obs["c2s_cell_type_score"]).max()
    return (
        f"{c2s.metadata.name} on a Dask worker ({', '.join(sum(devices.values(), []))}): same label as in this "
        f"process for {same:.0%} of {cells.n_obs} cells, scores max |Δ| = {score:.3g}"
    )


@contextlib.contextmanager
def one_at_a_time() -> Iterator[None]:
    """Score candidates one at a time, as for FlashAttention-2 or beyond a sliding window."""
    packs = _runtime.takes_custom_masks
    _runtime.takes_custom_masks = lambda model: False
    try:
        yield
    finally:
        _runtime.takes_custom_masks = packs


@contextlib.contextmanager
def timed(device: torch.device) -> Iterator[Callable[[], float]]:
    sync(device)
    start, end = time.perf_counter(), []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    sync(device)
    end.append(time.perf_counter())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    columns = ["model", "load s", "peak GiB", "constrained cells/s", "free cells/s", "embed cells/s"]
    columns += ["generate cells/s", "LoRA tokens/s", "full FT batch", "full FT tokens/s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c) for c in columns]
        lines.append(
            "| "
            + " | ".join(
                c if isinstance(c, str) else "–" if c is None else f"{c:,}" if isinstance(c, int) else f"{c:,.1f}"
                for c in cells
            )
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
