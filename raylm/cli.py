"""The `raylm` command line.

    raylm run jobs/quickstart.yaml                       # embedded local Ray
    raylm run jobs/quickstart.yaml --set train.lr=1e-3   # override any field
    raylm run spec.yaml --address http://127.0.0.1:8265  # submit through the Ray Jobs API
    raylm run jobs/pipeline.yaml --from sft              # a pipeline stage and its dependants again
    raylm lineage runs/pipeline/search/best              # the chain that produced an artifact
    raylm report runs/pipeline                           # one HTML page (a pipeline: each stage's too)
    raylm runs                                           # the run folders under runs/
    raylm validate jobs/*.yaml                           # every problem, with its dotted path
    raylm schema pretrain                                # JSON Schema of a job kind
    raylm jobs list|status|logs|stop --address http://127.0.0.1:8265

Only `raylm.spec` is imported at start-up; torch and ray load inside the commands that need them.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

import click

from raylm.kinds import KINDS, json_schema
from raylm.spec.loading import load_spec
from raylm.spec.reading import SpecError

EXIT_BAD_INPUT = 2
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


def fail(message: str, code: int = EXIT_BAD_INPUT):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def user_errors():
    """Exceptions that mean bad input: printed as a message, exit 2, no traceback."""
    from raylm.runtime.cluster import SubmitError
    from raylm.runtime.storage import RunFolderError

    return (SpecError, SubmitError, RunFolderError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="raylm")
def main():
    """raylm: LLM pretraining, fine-tuning, search, compression and serving from one job spec, on Ray."""
    # torchao (installed with the gptq extra; transformers and PEFT import it) warns on import about
    # its CUDA-only kernels and enums this torch already knows: nothing a raylm user can act on.
    # bitsandbytes (PEFT imports it) on a CPU with AVX512-BF16 tries to fetch a 4-bit kernel from the hub
    # when the `kernels` package is installed, and warns when it cannot: it computes with its own instead.
    for name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)


overrides_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a spec field, e.g. --set train.lr=3e-4 (repeatable).",
)


@main.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
@overrides_option
@click.option(
    "--address",
    default=None,
    metavar="URL",
    help="Ray dashboard (Jobs API) address to submit to; default: embedded local Ray.",
)
@click.option(
    "--no-follow", is_flag=True, help="With --address: submit and return without streaming the logs."
)
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="Also show Ray's own INFO lines (Ray Data plans, Ray Train reports).",
)
@click.option(
    "--from", "rerun_from", metavar="STAGE", help="A pipeline: re-run STAGE and every stage reading from it."
)
@click.option("--only", metavar="STAGE", help="A pipeline: run STAGE alone (its inputs must be complete).")
def run(spec_file, overrides, address, no_follow, verbose, rerun_from, only):
    """Run the job described by SPEC_FILE."""
    from raylm import submit

    try:
        job = load_spec(spec_file, overrides)
        if rerun_from is not None or only is not None:
            if job.kind != "pipeline":
                raise SpecError(
                    [("--from" if rerun_from else "--only", "applies to a pipeline spec only")],
                    source=spec_file,
                )
            flags = {"rerun_from": rerun_from, "only": only}
            job = load_spec(
                spec_file,
                (
                    *overrides,
                    *(f"{k}={v!r}" if v == "" else f"{k}={v}" for k, v in flags.items() if v is not None),
                ),
            )
        if address:
            job_id = submit.submit(address, job, verbose)
            click.echo(f"submitted {job_id} to {address}")
            if no_follow:
                click.echo(f"follow it with: raylm jobs logs {job_id} --address {address}")
                return
            status = submit.follow(address, job_id, click.echo)
            click.echo(f"job {job_id}: {status}")
            sys.exit(0 if status == "SUCCEEDED" else 1)
        summary = submit.run_here(job, verbose)
    except user_errors() as err:
        fail(str(err))
    except Exception as err:
        from ray.exceptions import RayTaskError
        from ray.train import TrainingFailedError

        if isinstance(err, RayTaskError) and job.kind == "pipeline":
            cause = err.cause if err.cause is not None else err
            fail(
                f"a stage failed: {type(cause).__name__}: {cause} (the stages before it are kept; "
                f"{job.output.path}/lineage.json says which ran)",
                code=1,
            )
        if isinstance(err, RayTaskError):  # a compression task: its traceback was printed above
            cause = err.cause if err.cause is not None else err
            fail(
                f"{job.kind} failed: {type(cause).__name__}: {cause} (nothing was written to {job.output.path})",
                code=1,
            )
        if not isinstance(err, TrainingFailedError):
            raise
        # Ray already printed each worker's traceback above; end with what failed and where things are.
        fail(
            f"training failed: {str(err).strip().splitlines()[0]} (checkpoints so far are kept under {job.output.path})",
            code=1,
        )
    _print_summary(summary)
    if summary.get("kind") == "tune" and summary.get("best") is None:
        sys.exit(1)  # a search without one completed trial has no result: a script must not go on


def _print_summary(summary: dict) -> None:
    if summary.get("kind") == "pipeline":  # its table is in the log above
        ran = sum(s["ran"] for s in summary["stages"].values())
        click.echo(
            f"[raylm] done: pipeline {summary['name']}: {ran} stage(s) ran, {len(summary['stages']) - ran} "
            f"skipped; lineage {summary['lineage']} (raylm lineage ARTIFACT)"
        )
        return
    if summary.get("kind") == "serve":
        click.echo(
            f"[raylm] {summary['model']}: "
            + ("stopped" if summary.get("stopped") else f"deployed at {summary['url']}")
        )
        return
    if summary.get("kind") == "tune":
        _print_search(summary)
        return
    if summary.get("kind") in ("quantize", "prune"):
        _print_compressed(summary)
        return
    if summary.get("kind") == "evaluate":  # its table is in the log above
        click.echo(f"[raylm] done: {summary['output']} (results.parquet, answers.parquet)")
        return
    metrics = summary.get("metrics") or {}
    click.echo(f"[raylm] done: {summary['run']} ({summary['steps']} steps)")
    if "val_ppl" in metrics:
        click.echo(f"[raylm] validation loss {metrics['val_loss']:.4f}, perplexity {metrics['val_ppl']:.2f}")
    if "reward_accuracy" in metrics:  # preference objectives: their own loss and the reward accuracy
        margin = f", reward margin {metrics['reward_margin']:.3f}" if "reward_margin" in metrics else ""
        click.echo(
            f"[raylm] validation loss {metrics['val_loss']:.4f}, reward accuracy "
            f"{metrics['reward_accuracy']:.3f}{margin}"
        )
    if "val_accuracy" in metrics:
        click.echo(f"[raylm] validation choice accuracy {metrics['val_accuracy']:.3f}")
    throughput = summary.get("throughput") or {}
    if throughput.get("tokens_per_s"):
        click.echo(
            f"[raylm] trained on {throughput['tokens']:,} tokens in {throughput['seconds']:.0f} s "
            f"({throughput['tokens_per_s']:,.0f} tokens/s)"
        )
    if "model" in summary:
        click.echo(f"[raylm] model saved to {summary['model']}")
    if "artifact" in summary:
        click.echo(f"[raylm] {summary['method']['name']} artifact saved to {summary['artifact']}")
        params = summary.get("parameters") or {}
        if params:
            click.echo(
                f"[raylm] trainable parameters {params['trainable']:,} of {params['total']:,} "
                f"({params['trainable_percent']:.3f}%), artifact {summary.get('artifact_bytes', 0):,} bytes"
            )
        before = (summary.get("exact_match_before") or {}).get("exact_match")
        after = (summary.get("exact_match") or {}).get("exact_match")
        if after is not None:
            click.echo(f"[raylm] exact match on held-out examples: {before} -> {after}")
    sample = summary.get("sample") or {}
    if sample:
        click.echo(f"[raylm] sample: {sample['prompt']!r} -> {sample['completion']!r}")


def _print_compressed(summary: dict) -> None:
    """A quantization's or a pruning's measures, before -> after."""
    after = "quantized" if summary["kind"] == "quantize" else "pruned"
    size, ppl, speed = summary["weights_bytes"], summary["perplexity"], summary["tokens_per_s"]
    click.echo(f"[raylm] done: {summary['artifact']}")
    line = f"[raylm] weights {size['original']:,} -> {size[after]:,} bytes ({size['ratio']:.2f}x)"
    bits = summary.get("bits_per_parameter")
    if bits:
        line += f"; {bits['all']:.2f} bits per parameter"
        if bits["quantized_weights"]:
            line += f" ({bits['quantized_weights']:.3f} in the quantized weights)"
    params = summary.get("parameters")
    if params:
        line += f"; parameters {params['original']:,} -> {params['pruned']:,}"
    click.echo(line)
    sparsity = summary.get("sparsity")
    if sparsity:
        click.echo(
            f"[raylm] sparsity of the {sparsity['layers']} pruned layers {sparsity['pruned_layers']:.1%} "
            f"(per layer {sparsity['min_layer']:.1%} to {sparsity['max_layer']:.1%}; target {sparsity['target']:.1%})"
        )
    removed = summary.get("removed")
    if removed:
        click.echo(
            f"[raylm] removed from every layer: {removed['heads_per_layer']} attention head(s), "
            f"{removed['channels_per_layer']} MLP channel(s)"
        )
    kept = summary.get("kept_full_precision") or []
    if kept:
        click.echo(
            f"[raylm] {len(kept)} layer(s) stay in full precision: bitsandbytes' 4-bit CPU kernel needs input "
            f"features in multiples of 64 and output features in multiples of 32 ({', '.join(kept[:2])}"
            f"{', ...' if len(kept) > 2 else ''})"
        )
    for r in summary.get("rounds") or []:
        click.echo(
            f"[raylm] round {r['round']}: sparsity {r['sparsity']:.1%}, retrained to validation perplexity "
            f"{r['val_ppl']:.3f} ({r['run']})"
        )
    if "before_recovery" in ppl:
        click.echo(
            f"[raylm] recovery training ({summary['recovery_run']}): held-out perplexity of the pruned model "
            f"{ppl['before_recovery']:.3f} -> {ppl[after]:.3f}"
        )
    click.echo(
        f"[raylm] held-out perplexity {ppl['original']:.3f} -> {ppl[after]:.3f} ({ppl['blocks']} blocks); "
        f"greedy tokens agreeing with the original {summary['greedy_agreement']:.1%}"
    )
    click.echo(
        f"[raylm] greedy generation {speed['original']:.1f} -> {speed[after]:.1f} tokens/s "
        f"on {summary['measured_on']}"
    )


def _print_search(summary: dict) -> None:
    counts = ", ".join(f"{n} {status}" for status, n in summary["trials"].items())
    click.echo(f"[raylm] done: search {summary['run']} ({counts}) in {summary['seconds']:.0f} s")
    best = summary.get("best")
    if best is None:
        click.echo("[raylm] no trial completed: nothing to pick (see the table above)")
        return
    values = ", ".join(f"{k}={v}" for k, v in best["values"].items() if v is not None)
    click.echo(
        f"[raylm] best trial {best['trial_id']}: {summary['metric']} {best[summary['metric']]:.4g} ({values})"
    )
    click.echo(
        f"[raylm] its spec: {best['spec']} (raylm run {best['spec']}); its artifact: {best['artifact']}"
    )
    click.echo(f"[raylm] table {summary['table']}, curves {summary['curves']}")


@main.command()
@click.argument("spec_files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@overrides_option
@click.option(
    "--no-files", is_flag=True, help="Check the spec only, not that its data and model paths exist here."
)
def validate(spec_files, overrides, no_files):
    """Check specs and report every problem at once (exit 2 if any)."""
    from raylm.kinds import preflight as check_job

    failed = False
    for spec_file in spec_files:
        try:
            job = load_spec(spec_file, overrides)
            problems = [] if no_files else check_job(job)
            if problems:
                raise SpecError(problems, source=spec_file)
        except SpecError as err:
            failed = True
            click.echo(str(err), err=True)
            continue
        click.echo(f"{spec_file}: ok ({job.kind})")
    if failed:
        sys.exit(EXIT_BAD_INPUT)


@main.command()
@click.argument("kind", required=False, type=click.Choice(sorted(KINDS)))
def schema(kind):
    """Print the JSON Schema of a job kind (default: all kinds)."""
    click.echo(json.dumps(json_schema(kind), indent=2))


@main.command()
@click.argument("spec_file", required=False, type=click.Path(dir_okay=False))
@overrides_option
@click.option(
    "--params",
    type=float,
    default=None,
    help="Estimate for a model of this many parameters (e.g. 1e9) instead of a spec.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Data-parallel workers (default: the spec's, else 1).",
)
@click.option(
    "--gpu-memory",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="GB",
    help="Memory per GPU, to say what fits.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default=None,
    help="Default: the spec's, else fp32.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="dtype the weights are loaded in (model.dtype). Default: the spec's, else float32.",
)
@click.option(
    "--batch", type=click.IntRange(min=1), default=None, help="Sequences per worker per micro-batch."
)
@click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Tokens per sequence.")
@click.option(
    "--gradient-checkpointing", is_flag=True, default=None, help="Recompute activations in backward."
)
@click.option(
    "--flash-attention/--no-flash-attention",
    default=None,
    help="Attention without seq^2 scores. Default with a SPEC: as its workers run it (SDPA keeps none, "
    "but on CPU workers training with attention dropout, or with model.attention: eager); with --params: "
    "on, for GPU workers (--no-flash-attention: CPU workers, scores kept).",
)
def estimate(
    spec_file,
    overrides,
    params,
    workers,
    gpu_memory,
    precision,
    dtype,
    batch,
    seq_len,
    gradient_checkpointing,
    flash_attention,
):
    """Per-worker training memory for each strategy: weights, gradients, optimizer, activations (a
    pipeline: for each of its training stages)."""
    options = {
        "workers": workers,
        "gpu_memory": gpu_memory,
        "precision": precision,
        "dtype": dtype,
        "batch": batch,
        "seq_len": seq_len,
        "gradient_checkpointing": gradient_checkpointing,
        "flash_attention": flash_attention,
    }
    if not spec_file and not params:
        fail("give a SPEC_FILE or --params")
    if spec_file and params:
        fail("give a SPEC_FILE or --params, not both (--params estimates a model of that size alone)")
    if not spec_file:
        from raylm.planning import memory

        flash = True if flash_attention is None else flash_attention
        options.update(flash_attention=flash, gpu=flash)  # a size alone: a GPU worker unless told otherwise
        click.echo(_memory_report(memory.shape_from_params(params), **options))
        return
    try:
        job = load_spec(spec_file, overrides)
    except SpecError as err:
        fail(str(err))
    if job.kind != "pipeline":
        try:
            click.echo(_job_estimate(job, spec_file, options))
        except SpecError as err:
            fail(str(_with_size_hint(err)))
        return
    trained = [s for s in job.order if job.job(s).kind == "tune" or hasattr(job.job(s), "train")]
    if not trained:
        fail(f"{spec_file}: no stage of this pipeline trains; estimate answers for training stages")
    unread = False
    for stage in trained:
        click.echo(f"\n== stage {stage} ({job.job(stage).kind})")
        producers = [
            r.stage for r in job.references(stage) if r.location[:1] in (("model",), ("base",), ("teacher",))
        ]
        try:
            click.echo(_job_estimate(job.job(stage), f"stage {stage}", options))
        except SpecError as err:  # said here: the other stages are still estimated
            if producers:
                click.echo(
                    f"[raylm] its model is stage {producers[0]}'s output, which does not exist yet: estimate "
                    f"it once {producers[0]} has run, or from its size alone (raylm estimate --params N)"
                )
            else:
                unread = True
                err.source = f"stage {stage}"
                click.echo(f"error: {_with_size_hint(err)}", err=True)
    if unread:
        sys.exit(EXIT_BAD_INPUT)


def _job_estimate(job, label: str, options: dict) -> str:
    """raylm estimate's table for one training job (a search: its base), the command line's options
    over the job's own values; fails (exit 2) naming what cannot be read."""
    from raylm.planning import memory, plan
    from raylm.runtime.storage import read_run_folders

    if job.kind == "tune":  # a search: one trial's base (its searched values may change it)
        click.echo("[raylm] estimating the search's base spec; its searched values may change it")
        job = job.base
    if not hasattr(job, "train"):
        fail(f"{label}: estimate answers for training jobs; a {job.kind} job does not train")
    problems = read_run_folders(job)
    if problems:
        raise SpecError(problems)
    shape = memory.shape_of_job(job)  # SpecError where the model cannot be read here
    preference = plan.preference_terms(job)  # two answers per example, a reference copy
    if preference and not options["batch"]:
        click.echo(
            f"[raylm] preference data: two answers per example, so batch {job.train.batch_size} "
            f"(pairs) is {preference['batch']} sequences"
        )
    # what `strategy: auto` counts for a fine-tuning method, and an explicit DeepSpeed's settings
    terms = {**plan.method_terms(job), **plan.deepspeed_terms(job.strategy)}
    if "exclude" in preference:
        terms["exclude"] = (*terms.get("exclude", ()), *preference["exclude"])
    gpu = job.resources.use_gpu
    given = {k: v for k, v in options.items() if v is not None}
    return _memory_report(
        shape,
        **{
            "workers": job.resources.max_workers,
            "precision": job.train.precision,
            "dtype": job.model.dtype,
            "batch": preference.get("batch", job.train.batch_size),
            "seq_len": job.data.seq_len,
            "gradient_checkpointing": job.train.gradient_checkpointing,
            "flash_attention": plan.flash_attention(job),
            "gpu_memory": None,
            **given,
        },
        gpu=gpu,
        teacher=plan.teacher_terms(job).get("teacher", 0.0),
        terms=terms,
        reference=preference.get("reference", 0.0),
    )


def _with_size_hint(err: SpecError) -> SpecError:
    if any(where == "model.path" for where, _ in err.problems):
        err.problems.append(
            (
                "hint",
                "estimate from the model's size alone, without the spec: raylm estimate --params 7e9 ...",
            )
        )
    return err


def _memory_report(shape, gpu: bool, teacher: float = 0.0, terms=None, reference: float = 0.0, **o) -> str:
    from raylm.planning import memory

    return memory.report(
        shape,
        o["workers"] or 1,
        o["precision"] or "fp32",
        o["batch"] or 1,
        o["seq_len"] or 2048,
        bool(o["gradient_checkpointing"]),
        bool(o["flash_attention"]),
        o["gpu_memory"],
        o["dtype"] or "float32",
        teacher,
        terms or {},
        gpu,
        reference,
    )


@main.command()
@click.argument("artifact")
@click.option("--out", "out", required=True, type=click.Path(), help="Folder for the merged model.")
@click.option("--base", default=None, help="Base model folder or URI (default: the one the run used).")
def merge(artifact, out, base):
    """Merge a LoRA / QLoRA / IA3 adapter into its base: a plain Hugging Face folder. ARTIFACT: the
    adapter folder or the fine-tuning run folder that wrote it, local or a storage URI (s3://, gs://)."""
    from raylm.infer.loading import adapter_base
    from raylm.methods.merging import MergeError, merge_adapter
    from raylm.runtime.storage import fetch_artifact, is_uri, run_artifact

    if not is_uri(artifact) and not Path(artifact).expanduser().is_dir():
        fail(f"{artifact}: no such folder (give an adapter folder, its run folder or a storage URI)")
    try:  # this node's copy of what a URI names; a fine-tuning run's folder: its adapter/
        folder = run_artifact(Path(fetch_artifact(artifact)).expanduser())
        merge_adapter(str(folder), out, adapter_base(folder, base))
    except OSError as err:  # pyarrow: no such bucket or object, no credentials
        fail(f"{artifact}: cannot read it: {err}")
    except (MergeError, ValueError) as err:  # ValueError: a RunFolderError, a record not JSON
        fail(str(err))
    click.echo(f"[raylm] merged model saved to {out}")


@main.command()
@click.argument("artifact")
def lineage(artifact):
    """Print the pipeline stages that produced ARTIFACT (a model, adapter or GGUF path, or a storage URI)."""
    from raylm.report import lineage as records

    try:
        found = records.find(artifact)
    except (OSError, ValueError) as err:  # an unreachable bucket, an unknown filesystem
        fail(f"{artifact}: cannot read it: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    if found is None:
        fail(f"{artifact}: no pipeline's lineage.json names it (looked in it and in the folders above it)")
    record, stage = found
    for line in records.describe(record, stage):
        click.echo(line)


@main.command()
@click.argument("run")
def report(run):
    """Write RUN/report.html: one self-contained page for a run, search, compression, evaluation or pipeline."""
    from raylm.report.sections import write_report

    try:
        written = write_report(run)
    except (OSError, ValueError) as err:
        fail(str(err))
    click.echo(f"[raylm] report written to {written}")


@main.command()
@click.argument("folder", default="runs")
def runs(folder):
    """List the run folders under FOLDER (default runs/): kind, status, steps, key metric, artifact, age."""
    from raylm.report.runs import age_text, listing
    from raylm.runtime import storage

    try:
        if not storage.is_uri(folder) and not Path(folder).is_dir():
            fail(f"{folder}: no such folder")
        found = listing(folder)
    except (OSError, ValueError) as err:
        fail(f"{folder}: {err}")
    if not found:
        click.echo(f"no raylm runs under {folder}")
        return
    rows = [("name", "kind", "status", "steps", "result", "artifact", "age")]
    rows += [
        (
            r["name"],
            r["kind"],
            r["status"],
            str(r["steps"] if r["steps"] is not None else "-"),
            r["metric"] or "-",
            r["artifact"] or "-",
            age_text(r["age"]),
        )
        for r in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@main.group()
def jobs():
    """Manage jobs submitted to a Ray cluster through the Jobs API."""


address_option = click.option(
    "--address",
    default=DEFAULT_DASHBOARD,
    show_default=True,
    metavar="URL",
    help="Ray dashboard (Jobs API) address.",
)


def _client(address):
    from raylm import submit

    try:
        return submit.client(address)
    except submit.SubmitError as err:
        fail(str(err))


@jobs.command("list")
@address_option
def jobs_list(address):
    """List submitted jobs."""
    for info in sorted(_client(address).list_jobs(), key=lambda j: j.start_time or 0):
        run_name = (info.metadata or {}).get("raylm_run", "-")
        click.echo(f"{info.submission_id or info.job_id}\t{info.status.value}\t{run_name}\t{info.entrypoint}")


def _job_call(address, job_id, method):
    try:
        return getattr(_client(address), method)(job_id)
    except RuntimeError as err:  # the SDK raises RuntimeError for unknown ids and HTTP errors
        fail(f"{job_id}: {err}")


@jobs.command("status")
@click.argument("job_id")
@address_option
def jobs_status(job_id, address):
    """Show a job's status."""
    info = _job_call(address, job_id, "get_job_info")
    click.echo(f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))


@jobs.command("logs")
@click.argument("job_id")
@address_option
@click.option("--follow", "-f", is_flag=True, help="Stream logs until the job ends.")
def jobs_logs(job_id, address, follow):
    """Print a job's logs."""
    if follow:
        from raylm import submit

        click.echo(f"job {job_id}: {submit.follow(address, job_id, click.echo)}")
    else:
        click.echo(_job_call(address, job_id, "get_job_logs"), nl=False)


@jobs.command("stop")
@click.argument("job_id")
@address_option
def jobs_stop(job_id, address):
    """Stop a running job."""
    stopped = _job_call(address, job_id, "stop_job")
    click.echo(f"{job_id}: {'stop requested' if stopped else 'not running'}")


def _control_options(command):
    """One flag per generation control (raylm.spec.generation.GenerationSpec), its help from the field."""
    from raylm.spec.generation import GenerationSpec

    for name, field in reversed(GenerationSpec.model_fields.items()):
        flag = "--" + name.replace("_", "-")
        if name == "stop":
            option = click.option(flag, "stop", multiple=True, help=field.description + " (repeatable)")
        else:
            kind = {int: int, float: float}.get(field.annotation, None)
            kind = kind or (int if name in ("top_k", "seed") else float)
            option = click.option(flag, name, type=kind, default=None, help=field.description)
        command = option(command)
    return command


def _strategy_options(command):
    """--strategy and its settings, one flag per field of raylm.spec.generation.StrategySpec."""
    from raylm.spec.generation import StrategySpec

    for name, field in reversed(StrategySpec.model_fields.items()):
        if name == "name":
            option = click.option(
                "--strategy",
                "strategy",
                type=click.Choice(["fewshot", "cot", "pal", "react"]),
                default=None,
                help=field.description,
            )
        else:
            kind = {"max_steps": int, "memory_mb": int, "timeout_s": float}.get(name, str)
            if get_origin(field.annotation) is Literal:  # e.g. --sandbox kernel|unconfined
                kind = click.Choice(get_args(field.annotation))
            option = click.option(
                "--" + name.replace("_", "-"),
                "strategy_" + name,
                type=kind,
                default=None,
                help=field.description,
            )
        command = option(command)
    return command


def _flag_problems(err: SpecError, prefix: str = "") -> SpecError:
    err.problems = [
        ("flags" if where == "spec" else "--" + prefix + where.replace("_", "-"), what)
        for where, what in err.problems
    ]
    return err


@main.command()
@click.argument("model_path", metavar="MODEL")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option(
    "--prompts", "prompts_file", type=click.Path(dir_okay=False), help='A JSON-lines file of {"prompt": ...}.'
)
@click.option(
    "--base", default=None, help="Base model folder of an adapter (default: the one it was trained on)."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt (choices, usage).")
@_control_options
@_strategy_options
def generate(model_path, prompts, prompts_file, base, device, as_json, strategy, **controls):
    """Generate from MODEL: a model folder (full, bitsandbytes or GPTQ), an adapter folder, a GGUF file
    or a raylm run folder, with greedy decoding, sampling or beam search, and optionally a prompting
    strategy (few-shot, chain-of-thought, PAL, ReAct)."""
    import json as json_module

    from raylm.spec.generation import GenerationSpec, StrategySpec
    from raylm.spec.loading import validate_section

    settings = {
        k.removeprefix("strategy_"): controls.pop(k) for k in list(controls) if k.startswith("strategy_")
    }
    given = {k: v for k, v in controls.items() if v is not None and v != ()}
    try:
        spec = validate_section(GenerationSpec, given, "generation flags")
    except SpecError as err:
        fail(str(_flag_problems(err)))
    settings = {k: v for k, v in settings.items() if v is not None}
    plan = None
    if strategy is None and settings:
        fail(f"--{next(iter(settings)).replace('_', '-')} is a strategy setting: add --strategy")
    if strategy is not None:
        if spec.n > 1:
            fail("--n: a strategy answers once per prompt; leave --n out")
        try:
            plan = validate_section(StrategySpec, {"name": strategy, **settings}, "strategy flags")
        except SpecError as err:
            fail(str(_flag_problems(err)).replace("--name", "--strategy"))
        from raylm.infer.strategies import StrategyError, prepare

        try:
            exemplars, tools = prepare(plan)
        except StrategyError as err:
            fail(str(err))
    texts = list(prompts)
    if prompts_file:
        try:
            lines = [
                line for line in open(prompts_file, encoding="utf-8").read().splitlines() if line.strip()
            ]
            texts += [str(json_module.loads(line)["prompt"]) for line in lines]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            fail(
                f'--prompts {prompts_file}: expected JSON lines with a "prompt" field ({type(err).__name__}: {err})'
            )
    if not texts:
        fail("give a prompt: --prompt TEXT (repeatable) or --prompts FILE.jsonl")

    import torch

    from raylm.infer.loading import LoadError, load_for_generation
    from raylm.infer.sampling import GenerationError, complete

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, tokenizer, what = load_for_generation(model_path, base, device)
    except LoadError as err:
        fail(str(err))
    if not as_json:
        click.echo(f"[raylm] {what} on {device}", err=True)
    if plan is not None:
        from raylm.infer import strategies

        run_one = strategies.completer(model, tokenizer, spec)
        for text in texts:
            outcome = strategies.run(plan, text, run_one, exemplars, tools)
            if as_json:
                click.echo(json_module.dumps({"prompt": text, "strategy": plan.name, **outcome.as_dict()}))
                continue
            click.echo(f"{text}\n{outcome.text}")
            click.echo(
                f"[raylm] {plan.name} answer: {outcome.answer}"
                if outcome.answer is not None
                else f"[raylm] {plan.name}: no answer ({outcome.error})",
                err=True,
            )
        return
    for text in texts:
        try:
            result = complete(model, tokenizer, text, spec)
        except GenerationError as err:
            fail(str(err))
        if as_json:
            click.echo(json_module.dumps({"prompt": text, **result}))
            continue
        for choice in result["choices"]:
            label = f"[{choice['index']}] " if spec.n > 1 else ""
            click.echo(f"{label}{text}{choice['text']}")
        click.echo(
            f"[raylm] {result['usage']['prompt_tokens']} prompt + {result['usage']['completion_tokens']} "
            f"generated tokens; finish: {', '.join(c['finish_reason'] for c in result['choices'])}",
            err=True,
        )
