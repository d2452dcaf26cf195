"""Speed of ``sc_c2s.tl.annotate`` (free and constrained) and ``sc_c2s.tl.embed``, beside a one-cell-at-a-time loop.

Wall-clock seconds give the rates; CPU seconds of the process are printed beside them, since a shared machine can
stretch wall-clock time. The baseline is the reference implementation's approach: one prompt at a time through
Hugging Face ``generate()`` (greedy, the same 32-token answer budget and the same stop tokens as free annotation).
Models have random weights (speed does not depend on them) and a word-level tokenizer over the genes, so a 200-gene
prompt is ~245 tokens.

- CPU (always): the small GPT-NeoX of ``sc_c2s.models._scratch`` (hidden 128, 2 layers), float32.
- GPU (``--gpu``, measured only where CUDA is available): the Pythia-410m architecture (hidden 1024, 24 layers,
  16 heads, MLP 4096, rotary 25 %, parallel residual), bf16. Targets on one H100: ≥ 500 cells/s for constrained
  annotation, ≥ 100× the loop.

Cells: the 300 CellBench cells of ``tests/data/cellbench_300.h5ad`` (repeated as needed), sentences of their top
200 genes. Constrained annotation is timed with the 5 cell lines (1 word each) and with 30 labels of 3 words.

    python benchmarks/bench_annotate.py          # CPU
    python benchmarks/bench_annotate.py --gpu    # CPU, then the 410m architecture on CUDA
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import torch
import transformers

import sc_c2s
from sc_c2s.models import C2SMetadata, C2SModel, _runtime
from sc_c2s.models._scratch import build_model, build_tokenizer
from sc_c2s.tl import _annotate

CELLS = Path(__file__).parents[1] / "tests" / "data" / "cellbench_300.h5ad"
N_GENES = 200
#: 30 labels of three words (four tokens with the period), e.g. "type 7 cell".
MANY_LABELS = [f"type {i} cell" for i in range(30)]
#: Width, depth and heads of Pythia-410m (EleutherAI/pythia-410m config.json; MLP width is 4 × hidden).
PYTHIA_410M = {"hidden_size": 1024, "n_layers": 24, "n_heads": 16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="also time the Pythia-410m architecture on CUDA")
    parser.add_argument("--cpu-cells", type=int, default=300, help="cells annotated on the CPU")
    parser.add_argument("--gpu-cells", type=int, default=8192, help="cells annotated on the GPU")
    parser.add_argument("--batch-size", type=int, help="cells per batch (default: the library's for the device)")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice)")
    args = parser.parse_args()
    sc.settings.verbosity = 0
    print(
        f"sc_c2s {sc_c2s.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}"
    )

    cells = load_cells(max(args.cpu_cells, args.gpu_cells if args.gpu else 0))
    if args.threads is not None:  # after the ranking: numba's OpenMP pool can reset torch's thread count
        torch.set_num_threads(args.threads)
    labels = sorted(cells.obs["cell_type"].unique())
    tokenizer = build_tokenizer(list(cells.uns["c2s"]["genes"]), [*labels, *MANY_LABELS], max_genes=N_GENES)
    network = build_model(tokenizer).eval()
    tiny = C2SModel(network, tokenizer, C2SMetadata(name="scratch-tiny-random", labels=labels), Path("tiny"))
    run(tiny, cells[: args.cpu_cells].copy(), labels, n_loop=min(16, args.cpu_cells), batch_size=args.batch_size)

    if not args.gpu:
        return
    if not torch.cuda.is_available():
        print("\nGPU: skipped, CUDA is not available on this machine.")
        return
    network = build_model(tokenizer, **PYTHIA_410M).to("cuda", torch.bfloat16).eval()
    big = C2SModel(network, tokenizer, C2SMetadata(name="pythia-410m-random", labels=labels), Path("pythia-410m"))
    run(big, cells[: args.gpu_cells].copy(), labels, n_loop=min(64, args.gpu_cells), batch_size=args.batch_size)


def load_cells(n_cells: int) -> ad.AnnData:
    """`n_cells` CellBench cells (the 300 repeated) with sentences of their top 200 upper-cased gene symbols."""
    adata = ad.read_h5ad(CELLS)
    adata.var_names = adata.var["gene_symbol"].str.upper()
    repeat = np.arange(n_cells) % adata.n_obs
    obs = adata.obs.iloc[repeat].set_axis([f"cell{i}" for i in range(n_cells)])
    adata = ad.AnnData(adata.X[repeat], obs=obs, var=adata.var)
    sc_c2s.pp.to_sentences(adata, n_genes=N_GENES, sentences=False, rank_fit=False)
    return adata


def run(c2s: C2SModel, cells: ad.AnnData, labels: list[str], *, n_loop: int, batch_size: int | None) -> None:
    device = c2s.device
    n_params = sum(p.numel() for p in c2s.model.parameters()) / 1e6
    n_tokens = np.mean(
        [len(i) for i in _runtime.tokenize(c2s.tokenizer, sc_c2s.prompts.cell_type_prediction_prompts(cells[:50]))]
    )
    batch = _runtime.resolve_batch_size(batch_size, device)
    print(
        f"\n{c2s.name}: {n_params:.1f}M parameters, {str(c2s.dtype).removeprefix('torch.')} on {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"vocabulary {len(c2s.tokenizer)} words, prompts of {N_GENES} genes = {n_tokens:.0f} tokens, "
        f"batch {batch or 'sized to memory'}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    methods: list[tuple[str, int, Callable[[ad.AnnData], object]]] = [
        ("annotate, free", cells.n_obs, lambda a: sc_c2s.tl.annotate(a, model=c2s, batch_size=batch_size)),
        (
            f"annotate, {len(labels)} labels",
            cells.n_obs,
            lambda a: sc_c2s.tl.annotate(a, model=c2s, labels=labels, batch_size=batch_size),
        ),
        (
            f"annotate, {len(MANY_LABELS)} labels × 4 tokens",
            cells.n_obs,
            lambda a: sc_c2s.tl.annotate(a, model=c2s, labels=MANY_LABELS, batch_size=batch_size),
        ),
        ("embed", cells.n_obs, lambda a: sc_c2s.tl.embed(a, model=c2s, batch_size=batch_size)),
        ("loop of generate(), 1 cell", n_loop, lambda a: generate_loop(c2s, a)),
    ]
    rates = {}
    print(f"  {'method':34s} {'cells':>6s} {'seconds':>8s} {'cells/s':>9s} {'CPU s':>8s}")
    for name, n_cells, call in methods:
        call(cells[: min(8, n_cells)].copy())  # warm-up
        subset = cells[:n_cells].copy()
        sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        call(subset)
        sync(device)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        rates[name] = n_cells / seconds
        print(f"  {name:34s} {n_cells:6d} {seconds:8.2f} {rates[name]:9.1f} {cpu:8.2f}")
    loop = rates.pop("loop of generate(), 1 cell")
    print("  speed-up over the loop: " + ", ".join(f"{name} {rate / loop:.0f}×" for name, rate in rates.items()))


def generate_loop(c2s: C2SModel, cells: ad.AnnData) -> list[str]:
    """The reference's way: each cell's prompt alone through ``generate()``, greedy, answer cut at the period."""
    tokenizer, stop = c2s.tokenizer, _runtime.period_ids(c2s.tokenizer)
    answers = []
    with torch.inference_mode():
        for prompt in sc_c2s.prompts.cell_type_prediction_prompts(cells, n_genes=N_GENES):
            inputs = tokenizer(prompt, return_tensors="pt").to(c2s.device)
            out = c2s.model.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                max_new_tokens=_annotate.MAX_ANSWER_TOKENS,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )
            text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            answers.append(text.strip().removesuffix("."))
    return answers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
