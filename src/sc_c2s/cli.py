"""The ``sc-c2s`` command: the demo, annotation, generation and the model registry from a shell.

Each subcommand is a thin layer over the Python API. A user error prints one line to stderr, saying what is
wrong, and exits with a code that says what went wrong; only a bug in sc_c2s or a library shows a traceback
(and Python's exit status 1):

====  ==========================================================
code  meaning
====  ==========================================================
0     success
1     a bug: the traceback says where (please report it)
2     bad command line, bad input, a file or folder that cannot be used, or a model too big for the device (the
      message says what to change)
3     a file or folder that was named does not exist
4     unknown model name
5     no network: a checkpoint could not be downloaded
6     an optional package is missing (the message names the extra that installs it, e.g. ``sc-c2s[gemma]``)
141   the reader of the output went away (``sc-c2s models list | head -1``), as a shell reports SIGPIPE
====  ==========================================================
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import logging
import os
import re
import secrets
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sc_c2s import _keys
from sc_c2s._utils._optional import MissingPackageError

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

#: Exit codes; bad input (and a model too big for the device) shares the status of a bad command line, so that 1
#: (Python's status after a traceback) means a bug.
EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_MISSING, EXIT_UNKNOWN_MODEL, EXIT_NO_NETWORK = 0, 1, 2, 3, 4, 5
#: Exit code when an optional package the command needs is not installed (the message names the extra).
EXIT_MISSING_PACKAGE = 6
#: Exit code when the output's reader has gone, as a shell gives a command that SIGPIPE ends (128 + 13).
EXIT_BROKEN_PIPE = 141
#: Folder the demo writes into unless told otherwise.
DEMO_DIR = "sc_c2s_demo"
#: Cells the demo generates per cell type.
DEMO_CELLS_PER_TYPE = 30
#: A Python argument name in a message of the package: `n_genes`, or with a value, `device='cuda'`.
PYTHON_NAME = re.compile(r"`(\w+)(?:=([^`]*))?`")
#: The variable transformers reads the level of its log from, when it is first imported.
TRANSFORMERS_VERBOSITY = "TRANSFORMERS_VERBOSITY"


class UnknownModelError(ValueError):
    """A ``--model`` that is neither a registry name, ``"demo"``, nor a checkpoint directory."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sc-c2s`` command with `argv` (default: the process arguments) and return its exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    import scanpy as sc

    verbosity = sc.settings.verbosity
    sc.settings.verbosity = 0 if args.quiet else "info" if args.verbose else "warning"
    options = _option_names(parser, args)
    try:
        with _warnings(quiet=args.quiet, options=options):
            args.run(args)
    except BrokenPipeError:  # the reader of our output left (`sc-c2s models list | head -1`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that Python's exit flush cannot fail
        return EXIT_BROKEN_PIPE
    except FileNotFoundError as e:
        return _fail(e, EXIT_MISSING, options)
    except UnknownModelError as e:
        return _fail(e, EXIT_UNKNOWN_MODEL, options)
    except MissingPackageError as e:
        return _fail(e, EXIT_MISSING_PACKAGE, options)
    except ConnectionError as e:
        return _fail(e, EXIT_NO_NETWORK, options)
    except (ValueError, KeyError, TypeError, MemoryError, OSError) as e:  # OSError: a cache or file we cannot use
        return _fail(e, EXIT_USAGE, options)
    finally:
        sc.settings.verbosity = verbosity
    return EXIT_OK


def _fail(error: Exception, code: int, options: dict[str, str]) -> int:
    """Print what went wrong on one line (the offline message keeps its list of files) and return `code`."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    if code != EXIT_NO_NETWORK:
        message = _one_line(message)
    print(f"sc-c2s: error: {_in_options(message, options)}", file=sys.stderr)
    return code


@contextlib.contextmanager
def _warnings(*, quiet: bool, options: dict[str, str]) -> Iterator[None]:
    """Show warnings as one line each (see :func:`_warn`); with `quiet`, none, nor the log below errors.

    Quiet, pooch does not log its downloads, nor transformers its warnings ("Token indices sequence length is
    longer than …").
    """
    import pooch

    logger = pooch.get_logger()
    with warnings.catch_warnings(), _transformers_errors_only() if quiet else contextlib.nullcontext():
        if quiet:
            warnings.simplefilter("ignore")
            logger.addFilter(_errors_only)
        warnings.showwarning = functools.partial(_warn, options=options)
        try:
            yield
        finally:
            logger.removeFilter(_errors_only)


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    """Raise the level of transformers' log to errors, and put it back after, without importing transformers.

    Its logger takes the level (imported already), and the environment the level that transformers gives it when
    it is first imported. Imported in between, the logger gets back the level the environment gave it before.
    """
    logger = logging.getLogger("transformers")
    imported = "transformers" in sys.modules
    level, verbosity = logger.level, os.environ.get(TRANSFORMERS_VERBOSITY)
    logger.setLevel(logging.ERROR)
    os.environ[TRANSFORMERS_VERBOSITY] = "error"
    try:
        yield
    finally:
        if imported or "transformers" not in sys.modules:
            logger.setLevel(level)
        else:  # transformers' own default: its variable's level, else warnings
            logger.setLevel(logging.getLevelNamesMapping().get((verbosity or "").upper(), logging.WARNING))
        if verbosity is None:
            os.environ.pop(TRANSFORMERS_VERBOSITY, None)
        else:
            os.environ[TRANSFORMERS_VERBOSITY] = verbosity


def _errors_only(record: logging.LogRecord) -> bool:
    """Let errors through (a logging filter; pooch's logger, outside logging's hierarchy, keeps a level it cached)."""
    return record.levelno >= logging.ERROR


def _warn(message: Warning | str, *args: object, options: dict[str, str]) -> None:
    """Show a warning as one line in the command's terms, without its Python source line (`warnings.showwarning`)."""
    print(f"sc-c2s: warning: {_in_options(_one_line(str(message)), options)}", file=sys.stderr)


def _one_line(message: str) -> str:
    """Join the lines of a message into one."""
    return re.sub(r"\s*\n\s*", " ", message.strip())


def _option_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """Map each option's Python name, the argument it sets, to the option: ``n_genes`` → ``--n-genes``.

    The options are those of `parser` and of the command that `args` runs, not those of the other commands.
    """
    names = {}
    for action in parser._actions:
        if isinstance(action.choices, dict):  # the commands, with their own options
            names |= _option_names(action.choices[getattr(args, action.dest)], args)
        elif action.option_strings:
            option = names[action.dest] = max(action.option_strings, key=len)
            if isinstance(action.const, bool):  # a flag: each value said as the flag given or left out
                names[f"{action.dest}={action.const}"] = option
                names[f"{action.dest}={not action.const}"] = f"no {option}"
    return names


def _in_options(message: str, options: dict[str, str]) -> str:
    """Say the Python argument names in a message of the package as the options that set them.

    A backticked name becomes its option (`n_genes` → --n-genes), one with a value the option and the value
    (`device='x'` → --device 'x'), and one set to None, the option left out (`device=None` → no --device). A flag
    reads as given or left out (`use_raw=False` → --no-raw, `use_raw=True` → no --no-raw). Names that are not
    options stay as they are.
    """

    def option(match: re.Match[str]) -> str:
        name, value = match.groups()
        if f"{name}={value}" in options:
            return options[f"{name}={value}"]
        if name not in options:
            return match[0]
        if not value:  # `n_genes` or `layer=`
            return options[name]
        return f"no {options[name]}" if value == "None" else f"{options[name]} {value}"

    return PYTHON_NAME.sub(option, message)


def _defaults(function: Callable[..., object]) -> dict[str, object]:
    """Return the default of each keyword of a Python verb, so that the command's defaults follow the API's."""
    return {name: parameter.default for name, parameter in inspect.signature(function).parameters.items()}


def _parser() -> argparse.ArgumentParser:
    from sc_c2s import __version__, tl

    parser = argparse.ArgumentParser(
        prog="sc-c2s",
        description="Cell2Sentence for Scanpy: annotate and generate cells with language models.",
        epilog="Exit codes: 0 success, 1 a bug (with a traceback), 2 bad command line, bad input or a model too big "
        "for the device, 3 missing file, 4 unknown model, 5 no network, 6 missing optional package, 141 output closed "
        "(| head).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="log every step (scanpy's info level)")
    loudness.add_argument(
        "-q", "--quiet", action="store_true", help="print errors only: no steps, warnings or progress bars"
    )
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="the whole job on scanpy's bundled PBMCs with the bundled demo model",
        description="Rank genes into cell sentences, fit and plot the rank -> expression model, annotate cell "
        "types, generate cells and score them, all offline on scanpy's pbmc68k_reduced with the demo model. "
        "Writes .h5ad files, PNG plots and report.txt into the output folder.",
    )
    demo.add_argument("--out", type=Path, default=Path(DEMO_DIR), help=f"output folder (default: ./{DEMO_DIR})")
    demo.add_argument(
        "--n-cells",
        type=int,
        default=DEMO_CELLS_PER_TYPE,
        help="cells to generate per cell type (default: %(default)s)",
    )
    _add_device(demo)
    demo.set_defaults(run=_demo)

    annotate = commands.add_parser(
        "annotate",
        help="annotate the cells of an .h5ad file",
        description="Predict the cell type of every cell with a C2S model; sentences are made first if the file "
        "has none. Writes obs['c2s_cell_type'] and its score.",
    )
    annotate.add_argument("input", type=Path, metavar="IN", help="input .h5ad (or .h5mu) file")
    _add_model(annotate)
    annotate.add_argument("--out", type=Path, required=True, help="output .h5ad file (.h5mu for an .h5mu input)")
    annotate.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        help="candidate cell types, or 'model' for the model's label set; without it the model writes its answer",
    )
    annotate.add_argument(
        "--n-genes",
        type=int,
        default=_defaults(tl.annotate)["n_genes"],
        help="genes per sentence (default: as many as the model was trained on)",
    )
    annotate.add_argument(
        "--rerank",
        type=int,
        metavar="N",
        help="with --labels, how many of each cell's most likely labels the cell-type generation task re-ranks; 0 "
        "for none (default: 3 for a model that sc_c2s.tl.finetune trained on both cell-type tasks, else 0)",
    )
    _add_ranking(annotate)
    annotate.add_argument(
        "--no-rank-fit",
        dest="rank_fit",
        action="store_false",
        help="rank without fitting the rank -> expression line, which annotation does not use (e.g. for binarised "
        "data, where it cannot be fitted)",
    )
    _add_device(annotate)
    annotate.set_defaults(run=_annotate)

    generate = commands.add_parser(
        "generate",
        help="generate cells of given types",
        description="Generate cells with a C2S model and write their sentences and reconstructed expression.",
    )
    _add_model(generate)
    generate.add_argument(
        "--cell-types",
        nargs="+",
        required=True,
        metavar="TYPE[=N]",
        help="cell types to generate, each with its number of cells, e.g. 'CD14+ Monocyte=100' (default 1)",
    )
    generate.add_argument("--out", type=Path, required=True, help="output .h5ad file")
    generate.add_argument(
        "--data",
        type=Path,
        metavar="IN",
        help="real cells (.h5ad or .h5mu) whose genes and rank fit to use; without it, the model's",
    )
    sampling = _defaults(tl.generate)
    generate.add_argument(
        "--n-genes",
        type=int,
        default=sampling["n_genes"],
        help="genes per sentence (default: each cell type's median length in training where the model records it, "
        "else as many as the model was trained on)",
    )
    generate.add_argument(
        "--temperature",
        type=float,
        default=sampling["temperature"],
        help="sampling temperature (default: the one recorded with the model, else 1.0)",
    )
    generate.add_argument(
        "--top-k",
        type=int,
        default=sampling["top_k"] or 0,
        help="top-k sampling, 0 for none (default: %(default)s)",
    )
    generate.add_argument(
        "--top-p",
        type=float,
        default=sampling["top_p"] or 1,
        help="nucleus sampling, 1 for none (default: %(default)s)",
    )
    generate.add_argument(
        "--allow-repeats", action="store_true", help="let a sentence name a gene more than once (default: once)"
    )
    generate.add_argument(
        "--any-length", action="store_true", help="let the model end a sentence early (default: --n-genes genes)"
    )
    generate.add_argument(
        "--seed", dest="random_state", metavar="SEED", type=int, default=0, help="random seed (default: %(default)s)"
    )
    _add_ranking(generate)
    _add_device(generate)
    generate.set_defaults(run=_generate)

    models = commands.add_parser("models", help="list or download checkpoints")
    models_commands = models.add_subparsers(title="models commands", dest="action", required=True, metavar="ACTION")
    models_commands.add_parser("list", help="checkpoints that open by name").set_defaults(run=_models_list)
    fetch = models_commands.add_parser("fetch", help="download a checkpoint into the cache")
    fetch.add_argument("name", help="a name from 'sc-c2s models list' or its Hugging Face repository")
    fetch.add_argument("--revision", help="commit, branch or tag (default: the registry's pinned one)")
    fetch.set_defaults(run=_models_fetch)
    return parser


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="a name from 'sc-c2s models list', 'demo', or a checkpoint directory"
    )


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="torch device, e.g. 'cuda' or 'cpu' (default: CUDA if available)")
    parser.add_argument("--batch-size", type=int, help="cells per batch (default: chosen for the device)")


def _add_ranking(parser: argparse.ArgumentParser) -> None:
    again = "; given, an input that already has cell sentences is ranked again"
    parser.add_argument("--gene-symbols", help=f"var column with the gene names, if var_names are not{again}")
    parser.add_argument("--layer", help=f"layer to rank instead of X (or raw){again}")
    parser.add_argument(
        "--no-raw",
        dest="use_raw",
        action="store_false",
        default=None,
        help=f"rank X (or --layer) where the input also has .raw, which is ranked by default{again}",
    )
    parser.add_argument("--mod", help="modality of an .h5mu file (default: 'rna')")


def _say(message: str) -> None:
    """Print a line about the progress of a command on stderr, unless ``--quiet``."""
    import scanpy as sc

    if sc.settings.verbosity > 0:
        print(f"sc-c2s: {message}", file=sys.stderr, flush=True)


def _step(message: str) -> float:
    """Announce a step of a command on stderr and return its start time."""
    _say(message)
    return time.perf_counter()


def _check_model(name: str) -> None:
    """Refuse a ``--model`` that cannot be loaded.

    Exit codes: 4 for an unknown name, 3 for a missing directory, 2 for a file.
    """
    from sc_c2s.models._load import check_name_or_path
    from sc_c2s.models._registry import names

    try:
        check_name_or_path(name)
    except ValueError as e:
        if Path(name).expanduser().exists():  # not a folder: those pass
            msg = (
                f"{name!r} is a file, not a checkpoint directory; pass the folder that holds the model's config.json "
                "and weights, or a name from 'sc-c2s models list'."
            )
            raise ValueError(msg) from e
        if "/" in name or "\\" in name:
            msg = f"{name!r} is not a checkpoint directory."
            raise FileNotFoundError(msg) from e
        msg = f"No model called {name!r}. Available: {', '.join(names())}; or pass a checkpoint directory."
        raise UnknownModelError(msg) from e


def _check_device(args: argparse.Namespace) -> None:
    """Refuse a ``--device`` torch cannot use and a ``--batch-size`` below 1, before any work."""
    from sc_c2s._utils._validate import check_positive_int
    from sc_c2s.models._runtime import check_device

    if args.batch_size is not None:
        check_positive_int(args.batch_size, "batch_size")
    if args.device is not None:
        check_device(args.device)


def _model(name: str, *, device: str | None):
    """Load a model (checked by :func:`_check_model`), announcing the step."""
    from sc_c2s import models

    start = _step(f"loading model {name!r}")
    model = models.load(name, device=device)
    _done(start)
    return model


def _done(start: float) -> None:
    _say(f"    done in {time.perf_counter() - start:.1f} s")


def _read(path: Path) -> AnnData | MuData:
    """Read an .h5ad (or .h5mu) file; one that cannot be read is bad input, named with the reader's reason."""
    if not path.exists():
        msg = f"No such file: {str(path)!r}."
        raise FileNotFoundError(msg)
    if not path.is_file():
        msg = f"{str(path)!r} is a folder, not an .h5ad or .h5mu file."
        raise ValueError(msg)
    start = _step(f"reading {path}")
    kind = _kind(path)
    try:
        if kind == ".h5mu":
            import mudata

            data = mudata.read_h5mu(path)
        else:
            import anndata

            data = anndata.read_h5ad(path)
    except Exception as e:  # whatever the reader says, the file is not one it can read
        reason = " ".join(str(e).split()) or type(e).__name__
        msg = f"Cannot read {str(path)!r} as an {kind} file (is it one, and complete?): {reason}"
        raise ValueError(msg) from e
    _done(start)
    return data


def _check_out(path: Path, *, kind: str) -> None:
    """Refuse an output path that cannot be written, before any work is done.

    `kind` is what will be written: ``".h5ad"`` (an AnnData), ``".h5mu"`` (a MuData) or ``"folder"``. Refused:
    a path under a file or in a folder that may not be written to, a folder where a file goes or the other way
    round, a file name of the other kind.
    """
    folder = kind == "folder"
    existing = [path.absolute()] if folder and path.is_dir() else []  # a folder written into; a file's is replaced
    above = next(p for p in [*existing, *path.absolute().parents] if p.exists())
    if not above.is_dir():
        msg = f"Cannot write {str(path)!r}: {str(above)!r} is a file, not a folder."
        raise ValueError(msg)
    if not os.access(above, os.W_OK | os.X_OK):
        msg = f"Cannot write {str(path)!r}: you may not write into the folder {str(above)!r}; name another path."
        raise ValueError(msg)
    if path.exists() and path.is_dir() != folder:
        what = "a file, not a folder" if path.is_file() else "a folder; name a file to write, e.g. result.h5ad"
        msg = f"Cannot write {str(path)!r}: it is {what}."
        raise ValueError(msg)
    if not folder and path.suffix != kind:
        what = "a MuData; name an .h5mu file" if kind == ".h5mu" else "an AnnData; name an .h5ad file"
        msg = f"Cannot write {str(path)!r}: the result is {what}."
        raise ValueError(msg)


def _kind(path: Path) -> str:
    """Say what reading `path` gives (".h5ad" or ".h5mu"), and so what its results are written as."""
    return ".h5mu" if path.suffix == ".h5mu" else ".h5ad"


def _write(data: AnnData | MuData, path: Path) -> None:
    """Write `data` to `path` whole or not at all (see :func:`_writing`)."""
    with _writing(path) as partial:
        if path.suffix == ".h5mu":
            data.write_h5mu(partial)
        else:
            data.write_h5ad(partial)
    _say(f"wrote {path}")


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[Path]:
    """Give a temporary path beside `path` to write, and rename it onto `path` once written.

    A failed write (a full disk, a folder in the way) leaves neither a half-written file nor a damaged earlier
    result at `path`, and is a user error that names `path`. The temporary path keeps the suffix of `path`.
    """
    partial = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield partial
        os.replace(partial, path)
    except OSError as e:
        msg = f"Cannot write {str(path)!r}: {e}"
        raise ValueError(msg) from e
    finally:
        partial.unlink(missing_ok=True)


def _sentences(
    data: AnnData | MuData, args: argparse.Namespace, *, rank_fit: bool = True, fit_needed: bool = False
) -> None:
    """Rank genes into sentences unless the data already has them and no ranking option (--layer …) is given.

    `rank_fit` says whether ranking also fits the rank → expression line. With `fit_needed`, an input whose
    sentences lack that fit is ranked again.
    """
    import sc_c2s
    from sc_c2s._data import DataHandler

    handler = DataHandler(data, args.mod)
    ranking = {"layer": args.layer, "gene_symbols": args.gene_symbols, "use_raw": args.use_raw}
    options = {"--layer": args.layer, "--gene-symbols": args.gene_symbols}
    given = [f"{option} {value!r}" for option, value in options.items() if value is not None]
    if args.use_raw is False:
        given.append("--no-raw")
    if _keys.C2S not in handler.uns or _keys.GENES not in handler.obsm:
        start = _step("ranking genes into cell sentences")
    elif given:
        start = _step(f"the input has cell sentences; ranking genes again, with {' and '.join(given)}")
    elif fit_needed and "rank_fit" not in handler.uns[_keys.C2S]:
        start = _step("the input has cell sentences without their rank -> expression fit; ranking them again to fit it")
        ranking = handler.uns[_keys.C2S]["params"]  # as they were ranked
    else:
        return
    sc_c2s.pp.to_sentences(data, **{**ranking, "rank_fit": rank_fit, "mod": args.mod})
    _done(start)


def _annotate(args: argparse.Namespace) -> None:
    import sc_c2s

    _check_out(args.out, kind=_kind(args.input))
    _check_model(args.model)
    _check_n_genes(args)
    _check_labels(args)
    _check_device(args)
    data = _read(args.input)
    _sentences(data, args, rank_fit=args.rank_fit)
    model = _model(args.model, device=args.device)
    labels = args.labels[0] if args.labels == ["model"] else args.labels
    start = _step("annotating")
    options = {"n_genes": args.n_genes, "rerank": args.rerank, "batch_size": args.batch_size, "mod": args.mod}
    sc_c2s.tl.annotate(data, model=model, labels=labels, **options)
    _done(start)
    _write(data, args.out)


def _cell_types(items: Sequence[str]) -> dict[str, int]:
    """``["B=3", "NK"]`` → ``{"B": 3, "NK": 1}``; a type named twice adds up."""
    counts: dict[str, int] = {}
    for item in items:
        name, sep, n = item.rpartition("=")
        if not sep:
            name, n = item, "1"
        if not name.strip() or not n.strip().isdigit():
            msg = f"--cell-types takes TYPE or TYPE=N with N a number of cells (0, 1, 2, ...), got {item!r}."
            raise ValueError(msg)
        counts[name.strip()] = counts.get(name.strip(), 0) + int(n)
    if not sum(counts.values()):
        msg = (
            f"--cell-types {shlex.join(items)} asks for no cells; give a TYPE=N an N of 1 or more (TYPE alone is 1 "
            "cell)."
        )
        raise ValueError(msg)
    return counts


def _generate(args: argparse.Namespace) -> None:
    import sc_c2s
    from sc_c2s.tl._sampling import check_sampling

    _check_out(args.out, kind=".h5ad")
    cell_types = _cell_types(args.cell_types)
    _check_model(args.model)
    _check_n_genes(args)
    _check_sampling_options(args)
    sampling = _sampling(args)
    check_sampling(**sampling, none_for_model=args.temperature is None)
    _check_device(args)
    data = None
    if args.data is not None:
        data = _read(args.data)
        _sentences(data, args, fit_needed=True)
    model = _model(args.model, device=args.device)
    start = _step(f"generating {sum(cell_types.values())} cells")
    generated = sc_c2s.tl.generate(
        data,
        model=model,
        cell_types=cell_types,
        **sampling,
        unique_genes=not args.allow_repeats,
        exact_length=not args.any_length,
        batch_size=args.batch_size,
        mod=args.mod,
    )
    _done(start)
    _write(generated, args.out)


def _check_n_genes(args: argparse.Namespace) -> None:
    """Refuse an --n-genes that is not a positive integer (left out, it is the model's)."""
    from sc_c2s._utils._validate import check_positive_int

    if args.n_genes is not None:
        check_positive_int(args.n_genes, "n_genes")


def _check_labels(args: argparse.Namespace) -> None:
    """Refuse 'model' among other --labels, a negative --rerank, and --rerank without --labels.

    Without --labels, the model's metadata decides whether to re-rank.
    """
    if args.labels is not None and "model" in args.labels and len(args.labels) > 1:
        msg = "--labels model stands for the model's label set, alone; give it alone, or list the cell types."
        raise ValueError(msg)
    if args.rerank is None:
        return
    if args.rerank < 0:
        msg = f"--rerank must be a whole number of labels, or 0 for no re-ranking; got {args.rerank}."
        raise ValueError(msg)
    if args.rerank and args.labels is None:
        msg = "--rerank re-ranks the candidate labels of --labels; pass --labels (e.g. --labels model) too."
        raise ValueError(msg)


def _check_sampling_options(args: argparse.Namespace) -> None:
    """Refuse a --top-k, --top-p or --seed out of range in the command's terms: its "none" is --top-k 0, --top-p 1."""
    from sc_c2s._utils._validate import SEED_LIMIT

    if args.top_k < 0:
        msg = f"--top-k must be a positive whole number, or 0 for no top-k sampling; got {args.top_k}."
        raise ValueError(msg)
    if not 0 < args.top_p <= 1:
        msg = f"--top-p must be a number above 0 and at most 1, where 1 is no nucleus sampling; got {args.top_p:g}."
        raise ValueError(msg)
    if not 0 <= args.random_state < SEED_LIMIT:
        msg = f"--seed must be a whole number from 0 to 2**{SEED_LIMIT.bit_length() - 1} - 1; got {args.random_state}."
        raise ValueError(msg)


def _sampling(args: argparse.Namespace) -> dict[str, object]:
    """Return the sampling arguments of :func:`sc_c2s.tl.generate` that the options of ``generate`` stand for."""
    return {
        "n_genes": args.n_genes,
        "temperature": args.temperature,
        "top_k": args.top_k or None,
        "top_p": None if args.top_p == 1 else args.top_p,
        "random_state": args.random_state,
    }


def _models_list(args: argparse.Namespace) -> None:
    import pandas as pd

    from sc_c2s import models

    known = models.available()
    doubtful = known["unconfirmed"].map(set)  # values the registry could not confirm, marked as in the README
    table = known[["size_gb", "tasks", "organism", "license"]].copy()
    table["size_gb"] = [
        f"{'~' if 'size_gb' in doubt else ''}{gb:.2f}" if gb >= 0.01 else "<0.01"
        for gb, doubt in zip(table["size_gb"], doubtful, strict=True)
    ]
    table["tasks"] = table["tasks"].map(lambda tasks: ", ".join(t.replace("cell_type_", "") for t in tasks))
    for column in ["tasks", "organism", "license"]:
        marked = doubtful.map(lambda doubt, column=column: column in doubt) & table[column].notna()
        table.loc[marked, column] += " (unconfirmed)"
    table["license"] = table["license"].fillna("see the model card")
    with pd.option_context("display.max_colwidth", 90, "display.width", 250):
        print(table.fillna("").to_string())


def _models_fetch(args: argparse.Namespace) -> None:
    from sc_c2s import models

    known = models.available()
    if args.name not in known.index and args.name not in set(known["repo"].dropna()):
        msg = f"No model called {args.name!r}. Available: {', '.join(known.index)}."
        raise UnknownModelError(msg)
    path = models.fetch(args.name, revision=args.revision)
    print(path)


def _demo(args: argparse.Namespace) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import numpy as np
    import scanpy as sc
    from matplotlib import pyplot as plt

    import sc_c2s
    from sc_c2s._utils._validate import check_positive_int

    out: Path = args.out
    _check_out(out, kind="folder")
    check_positive_int(args.n_cells, "n_cells")
    _check_device(args)
    out.mkdir(parents=True, exist_ok=True)
    label_key = "bulk_labels"
    start = _step("[1/6] reading scanpy's pbmc68k_reduced (700 PBMCs) and ranking genes into cell sentences")
    adata = sc.datasets.pbmc68k_reduced()
    sc_c2s.pp.to_sentences(adata)
    _done(start)

    start = _step("[2/6] plotting the rank -> expression fit")
    ax = sc_c2s.pl.rank_fit(adata, show=False)
    with _writing(out / "rank_fit.png") as partial:
        ax.figure.savefig(partial, dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    _done(start)

    model = _model("demo", device=args.device)
    start = _step("[3/6] annotating cell types with the demo model's labels")
    sc_c2s.tl.annotate(adata, model=model, labels="model", batch_size=args.batch_size)
    accuracy = float(np.mean(adata.obs[_keys.CELL_TYPE].astype(str) == adata.obs[label_key].astype(str)))
    _done(start)

    types = [t for t in adata.obs[label_key].value_counts().index if t in set(model.metadata.labels or [])][:4]
    start = _step(f"[4/6] generating {args.n_cells} cells of each of {len(types)} types")
    generated = sc_c2s.tl.generate(
        adata, model=model, cell_types=dict.fromkeys(types, args.n_cells), batch_size=args.batch_size
    )
    _done(start)

    start = _step("[5/6] scoring generated cells against real ones and plotting them together")
    scores = sc_c2s.tl.score_generation(adata, generated, label_key=label_key)
    ax = sc_c2s.pl.generation(adata, generated, label_key=label_key, basis="umap", show=False)
    with _writing(out / "generation.png") as partial:
        ax.figure.savefig(partial, dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    _done(start)

    start = _step("[6/6] writing results")
    _write(adata, out / "pbmc68k_c2s.h5ad")
    _write(generated, out / "generated.h5ad")
    with _writing(out / "generation_scores.csv") as partial:
        scores.to_csv(partial)
    report = _report(adata, generated, model=model, accuracy=accuracy, scores=scores, label_key=label_key)
    with _writing(out / "report.txt") as partial:
        partial.write_text(report, encoding="utf-8")
    _done(start)
    print(report)


def _report(adata, generated, *, model, accuracy: float, scores, label_key: str) -> str:
    """Compose the demo's text report."""
    import pandas as pd

    from sc_c2s import __version__

    fit = adata.uns[_keys.C2S]["rank_fit"]
    held_out = model.metadata.scores
    held_out_text = (
        ", ".join(f"{k} {v:.3f}" for k, v in held_out.items() if isinstance(v, float)) if held_out else "none recorded"
    )
    counts = generated.obs[["n_valid_genes", "n_unknown_words", "n_duplicate_genes"]].sum()
    columns = ["knn_recovery", "knn_recovery_control", "pearson", "pearson_control", "mmd", "mmd_control"]
    with pd.option_context("display.width", 200):
        table = scores[["n_real", "n_generated", *columns, "valid_rate"]].round(3).to_string()
    return "\n".join(
        [
            f"sc-c2s demo (sc_c2s {__version__}, model {model.name!r})",
            "",
            f"Data: scanpy's pbmc68k_reduced, {adata.n_obs} cells, {adata.obs[label_key].nunique()} cell types "
            f"in obs[{label_key!r}]; sentences of the {adata.raw.n_vars} genes of .raw.",
            f"Rank -> expression fit: slope {fit['slope']:.3f}, intercept {fit['intercept']:.3f}, "
            f"R^2 {fit['r2']:.3f} ({fit['n_cells']} cells).  Plot: rank_fit.png",
            "",
            f"Annotation with the model's {len(model.metadata.labels or [])} labels: accuracy {accuracy:.3f} "
            "against obs['bulk_labels'] (the demo model was trained on most of these cells; its held-out scores: "
            f"{held_out_text}).",
            "",
            f"Generation: {generated.n_obs} cells; {counts['n_valid_genes'] / counts.sum():.1%} of the generated words "
            "are genes.  Plot: generation.png",
            "Scores against the real cells, each beside a real-vs-real split-half control:",
            table,
            "",
            "Files: pbmc68k_c2s.h5ad (sentences, rank fit, annotation), generated.h5ad, generation_scores.csv, "
            "rank_fit.png, generation.png, report.txt",
            "",
        ]
    )
