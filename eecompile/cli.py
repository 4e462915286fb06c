"""The ``eecompile`` command line. Each command parses its options and calls the library, nothing more.

Exit codes: 0 success, 1 user error (bad spec, model, data or bundle: one line on stderr), 2 usage error
(unknown option, missing argument: click's message). ``--verbose`` shows tracebacks.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from eecompile.errors import EECompileError

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(fn: F) -> F:
    """Turn our exceptions into one line on stderr and exit status 1 (a traceback only with --verbose)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        verbose = bool(ctx.find_root().obj and ctx.find_root().obj.get("verbose"))
        try:
            return fn(*args, **kwargs)
        except EECompileError as e:
            if verbose:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as e:
            # A file error the library did not wrap (disk full, read-only, permissions): still one line.
            if verbose:
                raise
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}; check that the path exists, is writable and the disk "
                       f"has space", err=True)
            sys.exit(1)
        except Exception as e:
            # Not a user error: a bug. One line still, and how to get the traceback for the report.
            if verbose:
                raise
            text = str(e).strip().splitlines()
            click.echo(f"error: internal error ({type(e).__name__}: {text[0] if text else ''}); this is a bug in "
                       f"eecompile: rerun with --verbose and report the traceback", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


class _StdoutPipe(io.RawIOBase):
    """stdout for a pipe whose reader may leave early (``eecompile compile ... | head -1``): once a write
    fails with EPIPE, later output is dropped instead of raising, so the command finishes its work and exits
    with its own status (the report it prints is simply not read)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.gone = False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, data: Any) -> int:
        n = len(memoryview(data))
        if self.gone:
            return n
        try:
            return os.write(self.fd, data)
        except BrokenPipeError:
            self.gone = True
            return n


def _guard_stdout() -> None:
    """Replace sys.stdout by a :class:`_StdoutPipe` writer when stdout is a pipe (not a terminal or a file)."""
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
    except (AttributeError, ValueError, OSError):
        return
    old = sys.stdout
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(_StdoutPipe(fd)), encoding=old.encoding, errors=old.errors,
                                  line_buffering=bool(old.line_buffering))


def _parse_dims(values: tuple[str, ...]) -> dict[str, int] | None:
    """``--dim seq=128`` options as {name: size}."""
    if not values:
        return None
    dims: dict[str, int] = {}
    for item in values:
        name, sep, size = item.partition("=")
        if not sep or not name or not size.strip().isdigit() or int(size) < 1:
            raise click.BadParameter(f"'{item}': expected NAME=SIZE with a positive size, e.g. seq=128",
                                     param_hint="--dim")
        dims[name.strip()] = int(size)
    return dims


_dim_option = click.option(
    "--dim", "dims", multiple=True, metavar="NAME=SIZE",
    help="Size for a symbolic non-batch dimension (e.g. seq=128); repeatable. Default: 8 while probing.")


_public_key_option = click.option(
    "--public-key", type=click.Path(path_type=Path), default=None,
    help="Refuse the bundle unless it is signed (eecompile sign) by this PEM public key's owner.")


def _check_signature(bundle: Path, public_key: Path | None) -> None:
    if public_key is not None:
        from eecompile.signing import verify_bundle

        verify_bundle(bundle, public_key)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", is_flag=True, help="Show debug logging and tracebacks.")
@click.version_option(package_name="eecompile")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """eecompile: compile ONNX models into early-exit bundles and run them."""
    ctx.obj = {"verbose": verbose}
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the cut points as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List every cut point, not only the suggested ones.")
@_dim_option
@_user_errors
def analyze(model: Path, as_json: bool, show_all: bool, dims: tuple[str, ...]) -> None:
    """List the tensors MODEL can be cut at, with the compute before each.

    For each cut point: its shape ("batch" on the batch axis), the FLOPs per sample before it (a multiply-add
    counts 2) and as a share of the model, and the tensors a cut there carries to the next segment. Without
    --all, up to four suggestions spread over the FLOPs."""
    from eecompile.compiler import analyze_model

    report = analyze_model(model, _parse_dims(dims))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        report.print(show_all=show_all)


@cli.command(name="compile")
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), required=True, help="Bundle directory.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at OUTPUT.")
@click.option("--no-verify", is_flag=True, help="Skip the no-exit equivalence check (not recommended).")
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Verify's allowed error relative to the final output's scale (default: from the graph's "
                   "precision: 1e-5 for float32, one rounding step per boundary for float16).")
@click.option("--engines/--no-engines", default=True, show_default=True,
              help="Also build this machine's ONNX Runtime CPU engines (the chain optimised as one graph).")
@_dim_option
@_user_errors
def compile_cmd(spec: Path, output: Path, force: bool, no_verify: bool, dims: tuple[str, ...],
                tolerance: float | None, engines: bool) -> None:
    """Compile the model named in SPEC into an early-exit bundle.

    Cuts the model at each exit's tensor, attaches the heads, fuses the gates into the graphs, and checks that
    the chain with no exit taken equals the model before it writes OUTPUT (atomically; an earlier bundle there
    stays untouched on failure). With --engines (the default) the same write holds this machine's ONNX Runtime
    CPU engines. Prints one line per segment."""
    from eecompile.compiler import compile_model

    bundle = compile_model(spec, output, force=force, verify=not no_verify, dims=_parse_dims(dims),
                           tolerance=tolerance, engines=engines)
    m = bundle.manifest
    if m.decoder:
        _echo_decoder(output, m.decoder)
        return
    click.echo("\n".join(compile_summary(output, m)))


def compile_summary(output: Path, m: Any) -> list[str]:
    """``compile``'s lines for a single-pass bundle's manifest ``m``: the segments, each one's exit, what it carries.

    The early exits counted are the gated ones, one per threshold that ``run --thresholds`` takes; a segment that
    ends at the boundary before a jump target (MuE) has no exit and says so."""
    final = len(m.segments) - 1
    lines = [f"wrote {output}: {len(m.segments)} segments, {len(m.thresholds)} early exits, batch {m.batch_mode}"]
    for seg in m.segments:
        gate = seg.exit.gate
        what = (f"exit {seg.index}: {seg.exit.head}, {gate.kind} {gate.threshold:g}" if gate else "final exit"
                if seg.index == final else "no exit (the boundary before a jump target)")
        carried = ", ".join(seg.carried_out) or "-"
        lines.append(f"  segment {seg.index}: {seg.flops_fraction:6.1%} of the FLOPs; {what}; carries {carried}")
    return lines + [f"  {note}" for note in m.notes]


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "train", type=click.Path(path_type=Path), required=True,
              help="Training .npz (model inputs, optional labels) for the exit heads.")
@click.option("--calib", type=click.Path(path_type=Path), required=True, help="Calibration .npz.")
@click.option("--max-drop", type=float, required=True, help="Accuracy drop allowed, in (0, 1).")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), required=True, help="Bundle directory.")
@click.option("--candidates", type=click.IntRange(min=1), default=6, show_default=True, help="Cut points considered (from analyze).")
@click.option("--max-exits", type=click.IntRange(min=1), default=3, show_default=True, help="Most early exits kept.")
@click.option("--head", default="linear", show_default=True, help="Head kind trained at every candidate.")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True, help="Head training epochs.")
@click.option("--final", default=None, help="The model output the exits imitate (default: the only output).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size latencies are measured at.")
@click.option("--verify-top", type=click.IntRange(min=1), default=3, show_default=True,
              help="Best predicted configurations compiled and calibrated for real.")
@click.option("--compare", type=click.Path(path_type=Path), default=None,
              help="A spec with exits placed by hand, run through the same steps for the report.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at OUTPUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_dim_option
@_user_errors
def auto(model: Path, train: Path, calib: Path, max_drop: float, output: Path, candidates: int, max_exits: int,
         head: str, epochs: int, final: str | None, batch: int, verify_top: int, compare: Path | None, force: bool,
         as_json: bool, dims: tuple[str, ...]) -> None:
    """Choose where the exits go (analyze's cuts, heads trained at once, the fastest subset within budget)."""
    from eecompile.auto import auto_bundle

    report = auto_bundle(model, train, calib, output, max_drop=max_drop, candidates=candidates, max_exits=max_exits,
                         head=head, epochs=epochs, final=final, dims=_parse_dims(dims), batch_size=batch,
                         verify_top=verify_top, compare=compare, force=force, quiet=as_json)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        report.print()
        click.echo(f"wrote {output}: exits at {', '.join(report.chosen.exits)}")


@cli.command(name="train-heads")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help=".npz with the model inputs (decoder bundles: not used, see --text).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Default: 30 (decoder bundles: 24 with the MLP adapter, 8 with the attention adapter).")
@click.option("--labels/--no-labels", default=True, help="Use `labels` from the data when present.")
@click.option("--head-files/--no-head-files", default=True, show_default=True,
              help="Also train heads given as ONNX files (their weights, in place); off: keep them as they are.")
@click.option("--temperature", type=float, default=2.0, show_default=True, help="Distillation temperature.")
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Adam learning rate.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Samples per training step.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed (weight initialisation and shuffling).")
@click.option("--text", "texts", multiple=True, type=click.Path(path_type=Path),
              help="Decoder bundles: text files to distil on (default: the pydoc topics + the model's own text).")
@click.option("--draft-vocab", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Decoder bundles: tokens in the draft head's sub-vocabulary.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=6000, show_default=True,
              help="Decoder bundles: text positions to distil on.")
@click.option("--halting-beta", type=float, default=None,
              help="score: halting heads (PALBERT): weight of the KL to the geometric prior (a loss scale, nats). "
                   "Default: 0.1. Refused for a bundle without halting heads.")
@click.option("--halting-prior", type=float, default=None,
              help="score: halting heads (PALBERT): the geometric prior's halting probability per exit. Default: 0.5. "
                   "Refused for a bundle without halting heads.")
@click.option("--adapter", type=click.Choice(["mlp", "attention"]), default="mlp", show_default=True,
              help="Decoder bundles: the draft head's adapter, a residual MLP or Kangaroo's attention layer + norms "
                   "(with its own key/value cache).")
@_user_errors
def train_heads(bundle: Path, data: Path | None, epochs: int | None, labels: bool, head_files: bool,
                temperature: float, lr: float, batch: int, seed: int, texts: tuple[Path, ...], draft_vocab: int,
                max_tokens: int, halting_beta: float | None, halting_prior: float | None, adapter: str) -> None:
    """Train the bundle's exit heads on frozen features and splice them in.

    Decoder bundles: each exit gets a draft head (adapter + sub-vocabulary LM head) distilled from the model's
    own final-layer distribution on text (no labels)."""
    from eecompile.bundle import Bundle

    if Bundle.load(bundle, verify=False).manifest.decoder:
        from eecompile.decoder.train import train_draft_heads

        text = [t.read_text() for t in texts] if texts else None
        train_draft_heads(bundle, texts=text, vocab=draft_vocab, epochs=epochs, max_tokens=max_tokens,
                          seed=seed, adapter=adapter).print()
        return
    if click.get_current_context().get_parameter_source("adapter") is click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--adapter: only for decoder bundles (draft heads)")
    if data is None:
        raise click.UsageError("Missing option '--data' (an .npz with the model inputs).")
    epochs = 30 if epochs is None else epochs
    from eecompile.train import train_heads as run_training

    report = run_training(bundle, data, epochs=epochs, use_labels=labels, temperature=temperature, lr=lr,
                          batch_size=batch, seed=seed, head_files=head_files, halting_beta=halting_beta,
                          halting_prior=halting_prior)
    report.print()


class _ManyValues(click.Option):
    """A ``multiple`` option that also takes several values after one flag: ``--batch 1 4 8`` as well as
    ``--batch 1 --batch 4``. The values after the flag are taken while they look like numbers, so a
    positional argument or another option after them is left alone."""

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        for opt in self.opts:
            found = getattr(parser, "_long_opt", {}).get(opt) or getattr(parser, "_short_opt", {}).get(opt)
            if found is None or not hasattr(found, "process"):  # another click: repeated flags still work
                continue
            process = found.process

            def more(value: Any, state: Any, process: Any = process) -> None:
                process(value, state)
                while state.rargs and _is_number(state.rargs[0]):
                    process(state.rargs.pop(0), state)

            found.process = more


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _given(ctx: click.Context, names: tuple[str, ...]) -> list[str]:
    """The options among ``names`` (parameter names) given on the command line, by their last spelling
    (``--max-disagreement`` for ``--max-drop``: the name decoder calibration documents)."""
    params = {p.name: p for p in ctx.command.params}
    return [params[n].opts[-1] for n in names if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE]


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"'{text}': give comma-separated numbers, e.g. 0.3,0.5,0.7",
                                 param_hint=option) from None


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Calibration .npz (decoder bundles: not used, see --prompts).")
@click.option("--max-drop", "--max-disagreement", "max_drop", type=float, default=None,
              help="Accuracy drop allowed, in (0, 1). Decoder bundles, --mode exit: the share of generated tokens "
                   "allowed to differ from the full model's (token disagreement).")
@click.option("--method", type=click.Choice(["search", "ltt"]), default="search", show_default=True,
              help="search: cheapest thresholds whose upper confidence bound on the drop is within budget; "
                   "ltt: Learn-then-Test, a guarantee on new data (decoder exit mode: always ltt).")
@click.option("--confidence", type=float, default=None,
              help="Confidence of the bound (search) or of the guarantee (ltt), in (0, 1)  [default: 0.95]")
@click.option("--delta", type=float, default=None, help="Allowed failure probability, 1 - confidence.")
@click.option("--backend", default="onnxruntime", show_default=True, help="Backend to measure latency on.")
@click.option("--batch", "batches", cls=_ManyValues, multiple=True, type=click.IntRange(min=1),
              help="Batch size for latency measurement  [default: 1]. Decoder bundles: the batch sizes to choose "
                   "for (speculative: threshold and k or off; exit: exits on or off), e.g. --batch 1 4 8  "
                   "[default: 1 4 8].")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write the accuracy-speedup plot.")
@click.option("--reference-model", type=click.Path(path_type=Path), default=None,
              help="The unsplit .onnx to time as the baseline (a source model outside the bundle is not opened "
                   "because the manifest names it).")
@click.option("--error-budget", type=float, default=None,
              help="Regression outputs: a sample is wrong at an exit when its relative L2 error to the final "
                   "output exceeds this (0.05 = 5%); --max-drop bounds the fraction of such samples.")
@click.option("--steps", type=click.IntRange(min=2), default=None,
              help="Loop bundles: the step count to calibrate the loop gate for (written as the bundle's default).")
@click.option("--stages", default=None,
              help="Loop bundles: a staged profile (e.g. 7.5,5,2.5) whose scale is searched (default: the bundle's).")
@click.option("--mode", type=click.Choice(["speculative", "exit"]), default=None,
              help="Decoder bundles: speculative (draft-stop threshold and k for the highest measured tokens/s "
                   "at each --batch, drafting off where it does not pay) or exit (thresholds for a "
                   "--max-disagreement budget, Learn-then-Test)  [default: exit with --max-disagreement, "
                   "else speculative]")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Decoder bundles: a text file, one prompt per line  [default: built-in prompts and openings "
                   "of the pydoc topics that ship with Python]")
@click.option("--tokens", type=click.IntRange(min=1), default=None,
              help="Decoder bundles: new tokens per prompt  [default: 32 speculative, 64 exit]")
@click.option("--thresholds", "grid_thresholds", default=None,
              help="Decoder bundles, speculative: draft-stop max-prob thresholds to try  [default: 0.3,0.5,0.7]")
@click.option("--draft-tokens", "grid_ks", default=None,
              help="Decoder bundles, speculative: values of k (most tokens drafted per verification) to try  "
                   "[default: 2,4,6]")
@click.option("--min-speedup", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Decoder bundles: the median speedup over plain decoding that drafting (speculative) or exiting "
                   "(exit) must reach at a batch size, with the lower quartile of the rounds >= min(1, this); "
                   "else it is off there.")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="Decoder bundles: paired rounds (the mode against plain decoding, interleaved) timed per batch "
                   "size for the on/off decision  [default: 5]")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@_user_errors
def calibrate(bundle: Path, data: Path | None, max_drop: float | None, method: str, confidence: float | None,
              delta: float | None, backend: str, batches: tuple[int, ...], plot: Path | None,
              reference_model: Path | None, error_budget: float | None, mode: str | None, prompts_file: Path | None,
              tokens: int | None, grid_thresholds: str | None, grid_ks: str | None, min_speedup: float,
              rounds: int | None, threads: int | None, steps: int | None, stages: str | None) -> None:
    """Choose thresholds for an accuracy budget, from latencies measured on the backend.

    Exits with status 1, leaving the bundle as it was, when no setting meets the budget at the confidence
    asked for; the report then says how many calibration samples the budget needs.

    Decoder bundles (calibrated on prompts, not --data): --mode speculative measures plain decoding and a grid
    of (threshold, k) at each --batch and keeps the fastest, or switches drafting off there; --mode exit sets the
    exit thresholds for a --max-disagreement budget with the Learn-then-Test guarantee, then switches exits off
    at each --batch where they do not pay."""
    from eecompile.bundle import Bundle

    ctx = click.get_current_context()
    if Bundle.load(bundle, verify=False).manifest.decoder:
        _calibrate_decoder(ctx, bundle, mode=mode, max_drop=max_drop, confidence=confidence, delta=delta,
                           batches=batches, prompts_file=prompts_file, tokens=tokens,
                           grid_thresholds=grid_thresholds, grid_ks=grid_ks, min_speedup=min_speedup,
                           rounds=rounds, threads=threads)
        return
    decoder_only = _given(ctx, ("mode", "prompts_file", "tokens", "grid_thresholds", "grid_ks", "min_speedup",
                                "rounds", "threads"))
    if decoder_only:
        raise click.UsageError(f"{', '.join(decoder_only)}: only for decoder bundles (compiled from a 'kind: "
                               f"decoder' spec); {bundle} is a single-pass bundle, calibrated on --data.")
    if data is None or max_drop is None:
        raise click.UsageError("Missing option '--data' (a calibration .npz) or '--max-drop' (the accuracy "
                               "drop allowed).")
    if len(batches) > 1:
        raise click.UsageError(f"--batch: one batch size for a single-pass bundle's latency measurement, got "
                               f"{' '.join(map(str, batches))}")
    from eecompile.calibrate import calibrate_bundle
    from eecompile.runtimes.loop import parse_stages

    report = calibrate_bundle(bundle, data, max_drop=max_drop, method=method, confidence=confidence, delta=delta,
                              backend=backend, batch_size=batches[0] if batches else 1, plot=plot,
                              reference_model=reference_model, error_budget=error_budget, steps=steps,
                              stages=parse_stages(stages))
    report.print()
    if not report.deployed:
        need = report.samples_needed_best or report.samples_needed
        assert need is not None  # a calibration that deployed nothing says how many samples it needs
        if need > report.n_samples:
            fix = (f"Give more data (about {need} samples), a larger --max-drop or a lower --confidence")
        else:  # more samples would not help: the exits disagree with the final exit too often
            fix = ("Every setting that lets samples exit loses too much on these samples: train the heads "
                   "(eecompile train-heads) or allow a larger --max-drop")
        click.echo(f"error: no thresholds meet drop <= {max_drop:g} at confidence {report.confidence:g} with "
                   f"{report.n_samples} calibration samples; the bundle is unchanged. {fix}", err=True)
        sys.exit(1)


def _calibrate_decoder(ctx: click.Context, bundle: Path, *, mode: str | None, max_drop: float | None,
                       confidence: float | None, delta: float | None, batches: tuple[int, ...],
                       prompts_file: Path | None, tokens: int | None, grid_thresholds: str | None,
                       grid_ks: str | None, min_speedup: float, rounds: int | None, threads: int | None) -> None:
    """``calibrate`` on a decoder bundle: speculative (per batch size) or exit mode (LTT)."""
    from eecompile.decoder import calibrate as dcal

    given = _given(ctx, ("data", "plot", "reference_model", "error_budget", "method", "backend", "steps", "stages"))
    if given:
        raise click.UsageError(f"{', '.join(given)}: not used for a "
                               f"decoder bundle; it is calibrated on prompts (--prompts FILE, or the built-in "
                               f"ones) with ONNX Runtime")
    mode = mode or ("exit" if max_drop is not None else "speculative")
    prompts = dcal.read_prompts(prompts_file) if prompts_file is not None else None
    if mode == "exit":
        wrong = _given(ctx, ("grid_thresholds", "grid_ks"))
        if wrong:
            raise click.UsageError(f"{', '.join(wrong)}: only for --mode speculative")
        if max_drop is None:
            raise click.UsageError("Missing option '--max-disagreement' (the share of tokens allowed to differ "
                                   "from the full model's, e.g. 0.05) for --mode exit.")
        from eecompile.calibrate import resolve_confidence

        conf = resolve_confidence(confidence, delta)
        rec = dcal.calibrate_exit(bundle, max_disagreement=max_drop, delta=1.0 - conf, tokens=tokens or 64,
                                  prompts=prompts, threads=threads, require_certified=True,
                                  batches=batches or (1, 4, 8), min_speedup=min_speedup,
                                  rounds=rounds or dcal.ROUNDS)
        from eecompile.bundle import Bundle

        after = [int(e["after_layer"]) for e in Bundle.load(bundle).manifest.decoder["exits"]]  # type: ignore[index]
        click.echo("\n".join(dcal.exit_report(rec, after)))
        click.echo(f"wrote the exit-mode thresholds into {bundle}; `eecompile generate --mode exit` uses them "
                   f"(plain decoding at a --batch where exits are off)")
        return
    wrong = _given(ctx, ("max_drop", "confidence", "delta"))
    if wrong:
        raise click.UsageError(f"{', '.join(wrong)}: only for --mode exit (speculative decoding is lossless)")
    kw: dict[str, Any] = {}
    for name, text, option in (("thresholds", grid_thresholds, "--thresholds"), ("ks", grid_ks, "--draft-tokens")):
        vals = _floats(text, option)
        if vals is not None:
            if name == "ks" and any(v != int(v) for v in vals):
                raise click.BadParameter(f"'{text}': k is a whole number of tokens", param_hint=option)
            kw[name] = tuple(int(v) for v in vals) if name == "ks" else vals
    table = dcal.calibrate_speculative(bundle, batches=batches or (1, 4, 8), tokens=tokens or 32, prompts=prompts,
                                       min_speedup=min_speedup, threads=threads, rounds=rounds or dcal.ROUNDS,
                                       **kw)
    click.echo("\n".join(dcal.speculative_report(table)))
    click.echo(f"wrote the speculative choice per batch size into {bundle}; `eecompile generate --mode "
               f"speculative` uses the entry for its --batch")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="Engine backend.")
@click.option("--fp16", is_flag=True, help="Build half-precision engines (gates stay fp32).")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True, help="Largest batch size the engines accept.")
@click.option("--opt-batch", type=click.IntRange(min=1), default=None, help="Batch size to tune for (default: max-batch).")
@click.option("--workspace", type=click.IntRange(min=1), default=1024, show_default=True, help="Builder workspace, MB.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None, help="TensorRT timing cache file.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help=".npz whose shapes size the symbolic non-batch dimensions of the optimisation profiles.")
@_dim_option
@click.option("--device", "device_id", type=click.IntRange(min=0), default=0, show_default=True, help="CUDA device index.")
@click.option("--cache", is_flag=True,
              help="onnxruntime: keep the engines in your cache directory, not in the bundle (which, and whose "
                   "signature, stays unchanged); the runner finds them there.")
@_user_errors
def build(bundle: Path, backend: str, fp16: bool, max_batch: int, opt_batch: int | None, workspace: int,
          timing_cache: Path | None, data: Path | None, dims: tuple[str, ...], device_id: int, cache: bool) -> None:
    """Build one engine per segment for a backend."""
    from eecompile.build import build_engines

    report = build_engines(bundle, backend=backend, fp16=fp16, max_batch=max_batch, opt_batch=opt_batch,
                           workspace_mb=workspace, timing_cache=timing_cache, data=data,
                           dim_sizes=_parse_dims(dims), device=device_id, cache=cache)
    report.print()


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="tensorrt", show_default=True,
              help="Backend whose engines are compared with ONNX Runtime on CPU.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Inputs to compare on (default: random).")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Batch size to compare at.")
@_user_errors
def verify(bundle: Path, backend: str, data: Path | None, batch: int | None) -> None:
    """Compare each segment on BACKEND with ONNX Runtime on CPU (outputs and gate decisions)."""
    from eecompile.build import verify_backend

    report = verify_backend(bundle, backend=backend, data=data, batch=batch)
    report.print()
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True, help=".npz named after the model inputs.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output .npz.")
@click.option("--policy", type=click.Choice(["compact", "wait-all", "never"]), default="compact", show_default=True,
              help="compact: exited samples leave the batch; wait-all: every sample runs to the end and keeps its "
                   "first exit's output; never: no early exit fires.")
@click.option("--thresholds", default=None, help="Per early exit: a number, 'never' or 'always' (e.g. 0.9,never); "
                                                  "one value sets every exit.")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Samples per call.")
@click.option("--backend", default="onnxruntime", show_default=True, help="onnxruntime or tensorrt.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="ONNX Runtime device (cuda: CUDA execution provider with IO binding).")
@click.option("--max-input-bytes", type=click.IntRange(min=1), default=None,
              help="Input bytes held in memory at once (compressed arrays, casts); default "
                   "EECOMPILE_MAX_INPUT_BYTES or 8 GiB. Uncompressed arrays are streamed and do not count.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Loop bundles: the number of loop steps (default: the bundle's loop.steps).")
@click.option("--loop-threshold", default=None,
              help="Loop bundles: the loop gate's threshold, comma-separated stage thresholds (e.g. 7.5,5,2.5), "
                   "'never' (run every step) or 'always'.")
@click.option("--no-prepack", "no_prepack", is_flag=True,
              help="ONNX Runtime: weight prepacking off, so each weight is held once in memory (shared-weight "
                   "models: ~1x the model instead of ~3x) at a CPU cost (benchmarks/README.md, Shared weights).")
@_public_key_option
@_user_errors
def run(bundle: Path, data: Path, output: Path, policy: str, thresholds: str | None, batch: int, backend: str,
        threads: int | None, device: str, max_input_bytes: int | None, steps: int | None,
        loop_threshold: str | None, no_prepack: bool, public_key: Path | None) -> None:
    """Run BUNDLE on the inputs in --data and write the outputs and each sample's exit."""
    from eecompile.io import run_file

    _check_signature(bundle, public_key)
    options: dict[str, Any] = {"device": device} if device != "cpu" else {}
    if no_prepack:
        options["prepack"] = False
    if steps is not None or loop_threshold is not None:
        options = {**options, "steps": steps, "loop_threshold": loop_threshold}
    summary = run_file(bundle, data, output, policy=policy, thresholds=thresholds, batch_size=batch,
                       backend=backend, threads=threads, max_input_bytes=max_input_bytes, **options)
    click.echo(summary)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True, help=".npz named after the model inputs.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Samples per call.")
@click.option("--backend", default="onnxruntime", show_default=True, help="onnxruntime or tensorrt.")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed rounds per configuration (medians and ranges are reported).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--reference-model", type=click.Path(path_type=Path), default=None,
              help="The unsplit .onnx to time as the baseline (a source model outside the bundle is not opened "
                   "because the manifest names it).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Loop bundles: the number of loop steps to time (default: the bundle's loop.steps).")
@_public_key_option
@_user_errors
def bench(bundle: Path, data: Path, batch: int, backend: str, repeats: int, as_json: bool,
          reference_model: Path | None, steps: int | None, public_key: Path | None) -> None:
    """Latency percentiles, throughput, exit histogram and speedup against the unsplit model."""
    from eecompile.benchmark import bench_bundle, print_report

    _check_signature(bundle, public_key)
    report = bench_bundle(bundle, data, batch_size=batch, backend=backend, repeats=repeats,
                          reference_model=reference_model, steps=steps)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
@_user_errors
def inspect(bundle: Path, as_json: bool) -> None:
    """Show a bundle's segments, carried tensors, heads, gates, thresholds and engines."""
    from eecompile.inspect import describe_bundle, print_bundle

    if as_json:
        described = describe_bundle(bundle)
        click.echo(json.dumps(described, indent=2))
    else:
        described = print_bundle(bundle)
    if described.get("problems"):
        # A damaged bundle is described (to help find what broke) but is not a success.
        sys.exit(1)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="HTML file to write.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help=".npz to time the segments on (default: random inputs, when every dimension is fixed).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size for the latency measurement.")
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True,
              help="Runs per segment for the latency figures (medians).")
@_user_errors
def report(bundle: Path, output: Path, data: Path | None, batch: int, repeats: int) -> None:
    """Write one self-contained HTML page: segments, FLOPs, carried tensors, gates, calibration, latency."""
    from eecompile.serve.report import write_report

    click.echo(f"wrote {write_report(bundle, output, data=data, batch=batch, repeats=repeats)}")


@cli.group()
def export() -> None:
    """Write a bundle out for another serving system."""


@export.command(name="triton")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Model repository directory.")
@click.option("--segments", type=click.Choice(["bls", "in-process"]), default="bls", show_default=True,
              help="bls: segments as ONNX Runtime/TensorRT models chained by a Python BLS model; in-process: "
                   "the Python model runs the segments itself.")
@click.option("--name", default=None, help="Name of the chain model (default: from the bundle's name).")
@click.option("--max-batch-size", type=click.IntRange(min=0), default=32, show_default=True,
              help="0 turns dynamic batching off; decoder bundles: rows decoded together.")
@click.option("--queue-delay-us", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Dynamic batching: longest wait for more requests.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True, help="Instances of each model.")
@click.option("--engines", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True, help="bls: segment models on CPU, or on GPU with the TensorRT accelerator.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="in-process: ONNX Runtime threads per instance.")
@click.option("--force", is_flag=True, help="Replace an existing repository at OUTPUT.")
@_public_key_option
@_user_errors
def export_triton_cmd(bundle: Path, output: Path, segments: str, name: str | None, max_batch_size: int,
                      queue_delay_us: int, instances: int, engines: str, threads: int | None, force: bool,
                      public_key: Path | None) -> None:
    """Write a Triton Inference Server model repository for BUNDLE."""
    from eecompile.serve.triton import export_triton

    _check_signature(bundle, public_key)

    result = export_triton(bundle, output, name=name, segments=segments, max_batch_size=max_batch_size,
                           queue_delay_us=queue_delay_us, instances=instances, engines=engines, threads=threads,
                           force=force)
    click.echo(f"wrote {result.repository}: model '{result.model}' ({result.segment_backend}), "
               f"{len(result.models)} models")
    for note in result.notes:
        click.echo(f"  note: {note}")


def _parse_autoscale(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    lo, sep, hi = value.partition(":")
    if not sep or not lo.isdigit() or not hi.isdigit() or not 0 < int(lo) <= int(hi):
        raise click.BadParameter(f"'{value}': expected MIN:MAX replicas with 0 < MIN <= MAX, e.g. 1:4",
                                 param_hint="--autoscale")
    return int(lo), int(hi)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True, help="HTTP port.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray Serve replicas (one runner each).")
@click.option("--autoscale", default=None, metavar="MIN:MAX", help="Let Serve scale replicas between MIN and MAX.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Samples per runner call (and at most per request); decoder bundles: rows decoded together.")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long a batch waits for more requests after its first.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True,
              help="Larger request bodies get HTTP 413.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Loop bundles: most steps a request may ask for (more: HTTP 400) [default: 4 x the bundle's "
                   "loop.steps].")
@click.option("--backend", default="onnxruntime", show_default=True, help="onnxruntime or tensorrt.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads per replica.")
@click.option("--cpus-per-replica", type=float, default=1.0, show_default=True, help="Ray CPUs each replica holds.")
@click.option("--address", default=None, help="Join a running Ray cluster (e.g. auto) instead of starting one.")
@click.option("--no-prepack", "no_prepack", is_flag=True,
              help="ONNX Runtime: weight prepacking off in each replica (each weight held once; see run --help).")
@_public_key_option
@_user_errors
def serve(bundle: Path, host: str, port: int, replicas: int, autoscale: str | None, max_batch_size: int,
          batch_wait_ms: float, max_body_mb: float, max_steps: int | None, backend: str, threads: int | None,
          cpus_per_replica: float, address: str | None, no_prepack: bool, public_key: Path | None) -> None:
    """Serve BUNDLE over HTTP with Ray Serve: POST /v1/predict (decoder bundles: POST /v1/generate), GET
    /v1/health (until Ctrl-C)."""
    try:
        from eecompile.serve.ray_app import ServeOptions, serve_bundle
    except ImportError as e:
        raise click.ClickException(f"Ray Serve is not installed ({e}); `pip install 'eecompile[serve]'`") from e

    options = ServeOptions(bundle=str(bundle.resolve()), backend=backend,
                           backend_options={**({} if threads is None else {"threads": threads}),
                                            **({"prepack": False} if no_prepack else {})},
                           max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                           max_body_bytes=int(max_body_mb * (1 << 20)), max_steps=max_steps,
                           public_key=None if public_key is None else str(public_key.resolve()))
    serve_bundle(options, host=host, port=port, replicas=replicas, autoscaling=_parse_autoscale(autoscale),
                 cpus_per_replica=cpus_per_replica, address=address,
                 ready=lambda url, route="predict": click.echo(f"serving {bundle} at {url}/{route} (health: "
                                                               f"{url}/health); Ctrl-C stops", err=True))


def _echo_decoder(output: Path, dec: dict[str, Any]) -> None:
    click.echo("\n".join(decoder_summary(output, dec)))


def decoder_summary(output: Path, dec: dict[str, Any]) -> list[str]:
    """``compile``'s lines for a decoder bundle (``manifest.decoder``): its segments and what each owns, the
    key/value cache of its layers or, for a recurrent (Mamba-style) decoder, their recurrent state."""
    exits = ", ".join(f"after layer {e['after_layer']} (max_prob {e['gate']['threshold']:g}, k {e['draft_tokens']})"
                      for e in dec["exits"])
    state = dec.get("state")
    memory = (f"a recurrent state per layer (no cache), at most {dec['max_length']} positions" if state
              else f"cache {dec['max_length']} positions")
    owns = "recurrent state" if state else "key/value cache"
    return [f"wrote {output}: decoder, {dec['layers']} layers in {len(dec['segments'])} segments, vocabulary "
            f"{dec['vocab']}, {memory}; exits {exits}",
            *(f"  segment {k}: layers {seg['layers'][0]}..{seg['layers'][1] - 1} with their {owns}"
              for k, seg in enumerate(dec["segments"])),
            f"  head: final norm + LM head + max-prob gate, shared by every exit ({dec['head']['file']})"]


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text; repeatable (one row each).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Tokens to generate per prompt.")
@click.option("--mode", type=click.Choice(["none", "speculative", "exit"]), default="none", show_default=True,
              help="none: the full model; speculative: an exit drafts tokens, the full model verifies them "
                   "(lossless); exit: each token from the first confident exit.")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Rows run together (default: all prompts).")
@click.option("--thresholds", default=None, help="Per exit: max-prob, 'never' or 'always', comma-separated.")
@click.option("--draft-tokens", type=int, default=None, help="Speculative: most tokens drafted per verification.")
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature (with sampling).")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="tokenizer.json (default: the bundle's).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--exit-fill", type=click.Choice(["later", "propagate"]), default="later", show_default=True,
              help="--mode exit: the skipped layers' keys/values of an exited token: computed from its exit state "
                   "with the next token that goes deep, or propagated from it at once (CALM).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_user_errors
def generate(bundle: Path, prompts: tuple[str, ...], max_new_tokens: int, mode: str, batch: int | None,
             thresholds: str | None, draft_tokens: int | None, sample: bool, temperature: float, seed: int | None,
             tokenizer: Path | None, threads: int | None, exit_fill: str, as_json: bool) -> None:
    """Generate text with a decoder bundle: plain, self-speculative (lossless) or per-token exits."""
    from eecompile.runtimes.lm import SAMPLING_OPTIONS, DecoderRunner, unused_sampling_options

    given = [f"--{name}" for name in SAMPLING_OPTIONS
             if click.get_current_context().get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if (unused := unused_sampling_options(given, sample, "--sample")) is not None:
        raise click.UsageError(unused)

    runner = DecoderRunner(bundle, threads=threads, tokenizer=tokenizer)
    thr: Any = None
    if thresholds is not None:
        from eecompile.spec import parse_thresholds

        thr = parse_thresholds(thresholds, len(runner.exits))
    res = runner.generate(list(prompts), max_new_tokens, mode=mode, thresholds=thr, draft_tokens=draft_tokens,
                          sample=sample, temperature=temperature, seed=seed, batch=batch, exit_fill=exit_fill)
    if as_json:
        click.echo(json.dumps(res.to_dict()))
        return
    for r in res.results:
        click.echo(f"{r['prompt']}{r['text']}")
    extra = ""
    if res.acceptance_rate is not None and not res.stats.get("drafted"):  # nothing drafted: not a 0% acceptance
        extra = ("; no token drafted (drafting is off at this batch size in the bundle's calibration, or no draft "
                 "reached the threshold): decoded plainly")
    elif res.acceptance_rate is not None:
        extra = f"; acceptance {res.acceptance_rate:.1%}, {res.mean_accepted_length:.2f} tokens per verification"
    if res.exit_shares is not None:
        extra = "; exit shares " + " ".join(f"{s:.1%}" for s in res.exit_shares)
    click.echo(f"[{mode}] {res.tokens_per_s:.1f} tokens/s{extra}", err=True)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--private-key", type=click.Path(path_type=Path), required=True,
              help="EC private key, PEM (openssl ecparam -genkey -name prime256v1 -noout -out key.pem).")
@_user_errors
def sign(bundle: Path, private_key: Path) -> None:
    """Sign BUNDLE (every file, the manifest included) with a private key; writes BUNDLE/bundle.sig."""
    from eecompile.signing import sign_bundle

    sig = sign_bundle(bundle, private_key)
    click.echo(f"signed {bundle}: {sig}")


@cli.command(name="verify-signature")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--public-key", type=click.Path(path_type=Path), required=True,
              help="The signer's EC public key, PEM (openssl ec -in key.pem -pubout -out pub.pem).")
@_user_errors
def verify_signature(bundle: Path, public_key: Path) -> None:
    """Check BUNDLE's signature against --public-key: exit 0 when it holds, 1 naming what differs."""
    from eecompile.signing import verify_bundle

    verify_bundle(bundle, public_key)
    click.echo(f"signature holds: {bundle} is as signed by the holder of {public_key}")


def main() -> None:
    _guard_stdout()
    cli(prog_name="eecompile")


if __name__ == "__main__":
    main()
