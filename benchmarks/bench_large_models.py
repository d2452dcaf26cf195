"""Device check: the architectures of the published C2S checkpoints, at their real size, with random weights.

For Pythia-410m, Pythia-1b and Gemma-2-2B (and Gemma-2-27B in 4-bit where bitsandbytes is installed and the GPU
has room), in bfloat16 on one CUDA GPU, this prints: the time ``sc_c2s.models.load`` takes to open a saved
checkpoint, the peak GPU memory, annotation cells/s (constrained to the 5 CellBench cell lines, and free),
embedding cells/s, generation cells/s (200 genes, distinct, exact length) and LoRA training tokens/s. Then it
exercises the paths that need a GPU: ``load(..., quantization="8bit" | "4bit")`` through bitsandbytes and
``attn_implementation="flash_attention_2"`` (each where its package is installed), and checks that the packed
scoring of candidates under a 4-D mask gives the scores of one candidate at a time on this GPU.

Prompts: the 300 CellBench cells of ``tests/data/cellbench_300.h5ad`` (repeated as needed), their top 200 genes.
The tokenizer is a byte-level BPE trained on the gene names and the templates, as Pythia's splits genes into a
few tokens each (``--tokenizer word`` takes one token per gene instead); its vocabulary is padded to the
architecture's (50,304 or 256,000), so the output layer costs what it costs in the published models. Targets on
one H100/H200-class GPU for the 410m architecture: ≥ 500 annotated cells/s, ≥ 200 generated cells/s.

The whole run takes at most ~8 minutes; ``--smoke`` runs tiny models of the same architectures (but the real
vocabularies) on the CPU with 20-gene prompts, to check the script itself in a few minutes.

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
from collections.abc import Callable, Iterator
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
N_GENES = 200
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
    parser.add_argument("--tokenizer", choices=["bpe", "word"], default="bpe")
    parser.add_argument("--only", nargs="*", help="architectures to run, e.g. EleutherAI/pythia-410m")
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
    labels = sorted(cells.obs["cell_type"].unique())
    rows, checks = [], []
    work = Path(tempfile.mkdtemp(prefix="sc_c2s_bench_"))
    try:
        for base, n_cells, n_generate, n_steps in PLAN:
            if args.only and base not in args.only:
                continue
            if args.smoke:
                n_cells, n_generate, n_steps = 16, 4, 2
            config = dict(_memory.ARCHITECTURES[base]) | (
                SMOKE[_memory.ARCHITECTURES[base]["model_type"]] if args.smoke else {}
            )
            row = {"model": base.split("/")[1] + (" (smoke)" if args.smoke else "")}
            try:
                c2s, row["load s"], quantized = build(base, config, cells, labels, args, device, dtype, work)
            except SkipError as reason:
                print(f"\n{base}: skipped ({reason})")
                continue
            if quantized:
                row["model"] += " 4-bit"
            print(f"\n{c2s!r}: {prompt_tokens(c2s, cells):.0f} tokens per {N_GENES}-gene prompt")
            row |= measure(c2s, cells, labels, n_cells=n_cells, n_generate=n_generate, n_steps=n_steps)
            rows.append(row)
            checks += gpu_paths(base, c2s, cells, labels, work, device)
            del c2s
            free(device)
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
        text = [prompts.CELL_TYPE_PREDICTION, prompts.CELL_TYPE_GENERATION, " ".join(genes), *labels]
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


def build(base, config, cells, labels, args, device, dtype, work) -> tuple[C2SModel, float | None, bool]:
    """A random model of `config` with its tokenizer: saved and loaded with sc_c2s (timed), or built in place."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    genes = list(cells.uns["c2s"]["genes"])
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
        room = _runtime.free_memory(device) / 2**30
        if room < _memory.weights(shape) / 2**30 + 8:
            raise SkipError(
                f"building it in bfloat16 before quantising needs ~{_memory.weights(shape) / 2**30 + 8:.0f} GiB, {room:.0f} free"
            )
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


def measure(c2s, cells, labels, *, n_cells: int, n_generate: int, n_steps: int) -> dict[str, float]:
    """Peak memory and the rates of annotation, embedding, generation and LoRA training."""
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
    row["LoRA tokens/s"] = lora_rate(c2s, cells, labels, n_steps=n_steps)
    print(f"  {'LoRA tokens/s':22s} {row['LoRA tokens/s']:9.0f}")
    return row


def lora_rate(c2s: C2SModel, cells: ad.AnnData, labels: list[str], *, n_steps: int) -> float:
    """Tokens per second of LoRA training (rank 16, both tasks, batches of 8), or NaN without peft."""
    if not installed("peft"):
        print("  LoRA: skipped, peft is not installed")
        return float("nan")
    big = sum(p.numel() for p in c2s.model.parameters()) >= _lora.CHECKPOINTING_FROM
    quantized = any(type(m).__name__ == "Linear4bit" for m in c2s.model.modules())
    model = _lora.add_lora(c2s.model, rank=16, target_modules=None, gradient_checkpointing=big, quantized=quantized)
    n = n_steps * 4
    words = sc_c2s.prompts.sentence_words(cells[:n], n_genes=N_GENES)
    samples = _samples.encode(
        c2s.tokenizer,
        words,
        cells.obs["cell_type"].iloc[:n].astype(str).tolist(),
        tasks=("cell_type_prediction", "cell_type_generation"),
        organism="Homo sapiens",
        upper=True,
        max_length=4096,
    )
    n_tokens = sum(len(i) for i in samples.input_ids)
    with timed(c2s.device) as seconds:
        _trainer.train(
            model, samples, epochs=1, batch_size=8, learning_rate=1e-4, pad_id=_runtime.pad_id(c2s.tokenizer)
        )
    return n_tokens / seconds()


def gpu_paths(base, c2s, cells, labels, work, device) -> list[str]:
    """Packed against one-at-a-time candidate scores; quantised loading and FlashAttention-2 where installed."""
    lines = []
    subset = cells[:16].copy()
    words = prompts.sentence_words(subset, n_genes=N_GENES)
    ids = _runtime.tokenize(c2s.tokenizer, [prompts.cell_type_prediction(w) for w in words])
    with _runtime.inference(c2s.model):
        packed = _annotate.score_labels(c2s, ids, labels, batch_size=8)
        with one_at_a_time():
            single = _annotate.score_labels(c2s, ids, labels, batch_size=8)
    lines.append(
        f"{base}: packed vs one-at-a-time candidate log-likelihoods, max |Δ| = {np.abs(packed - single).max():.3g}"
    )
    path = work / base.split("/")[1]
    if device.type != "cuda" or not path.is_dir():
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
    return lines


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
    columns += ["generate cells/s", "LoRA tokens/s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c) for c in columns]
        lines.append(
            "| " + " | ".join(c if isinstance(c, str) else "–" if c is None else f"{c:,.1f}" for c in cells) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
