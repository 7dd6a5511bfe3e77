"""Driver of `kind: finetune`: supervised examples -> Ray Data -> Ray Train with one method -> artifact.

    raylm run jobs/finetune-lora.yaml
    raylm run jobs/finetune-lora.yaml --set method.r=16 --set output=runs/lora-r16

The run folder gets `adapter/` (a PEFT adapter folder, or the Houlsby adapter's own) or, for full and
freeze, `model/`; `merged/` with `output.merge: true`; `summary.json` with trainable and total
parameters, the artifact's size, peak memory, validation loss and exact match before and after.
"""

from __future__ import annotations

import json
from pathlib import Path

from raylm.methods.unimported import save_pretrained
from raylm.runtime import storage
from raylm.spec.jobs import FinetuneJob
from raylm.spec.reading import SpecError
from raylm.train.base_model import base_model
from raylm.train.runs import (
    announce,
    base_summary,
    finish,
    fit,
    planned_steps,
    prepare_run,
    resolve_strategy,
    tokenized,
)


class Finetune:
    """kind: finetune (a raylm.kinds.TrainingKind)."""

    def preflight(self, job: FinetuneJob) -> list[tuple[str, str]]:
        from raylm.data.sft import check_sft_data
        from raylm.runtime.preflight import check_finetune, check_training_inputs

        problems = check_sft_data(job.data) + check_training_inputs(job)
        return problems or check_finetune(job)

    def run(self, job: FinetuneJob) -> dict:
        return run_finetune(self, job)

    # ---- on each worker (raylm.train.loop calls these) -----------------------------------------

    def worker_model(self, job: FinetuneJob, tokenizer, device, rank: int, config: dict):
        """The base with the method applied (same seed on every rank: identical adapter init). Under
        fsdp and ZeRO-3 the other ranks build the structure only (`config["empty"]`) and receive rank
        0's weights when sharding. (The loop answers the held-out prompts before training.)"""
        import torch

        from raylm import methods
        from raylm.planning.models import empty_weights

        # only the structure: a sharded strategy fills it from rank 0; a base the method loads its own
        # way (QLoRA's 4-bit) is loaded on every rank, and the method's weights start equal everywhere
        empty = config["empty"] and not hasattr(methods.module(job.method.name), "load_base")
        # a sharded strategy moves each rank's shards to the device: the whole base stays on the host
        base = base_model(job, tokenizer, torch.device("cpu") if config["sharded"] else device, empty)
        if job.train.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(job.train.seed)
        with empty_weights(empty):
            model = methods.apply(base, job.method, tokenizer)
        if job.preference is not None and job.preference.disable_dropout:
            from raylm.train.preference import without_dropout

            without_dropout(model)
        if rank == 0:
            from raylm.planning.models import count_parameters
            from raylm.train.metrics import emit

            trainable, total = count_parameters(model)
            emit(
                f"[raylm] method {job.method.name}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.3f}%)"
            )
        return model, {}

    def worker_optimizer(self, job: FinetuneJob):
        """The method's own optimizer (QLoRA's bitsandbytes AdamW), or None (AdamW)."""
        from raylm import methods
        from raylm.train import optim

        make = getattr(methods.module(job.method.name), "optimizer", None)
        if make is None:
            return None
        method = job.method
        return lambda model, train: make(optim.param_groups(model, train), train.lr, train.betas, method)

    def worker_objective(self, job: FinetuneJob, tokenizer, device, engine, config: dict):
        """None: the causal-LM loss (T-Few's objectives for choices data); for preference data the
        preference objective, whose reference is the model with its adapters off (adapter methods)
        or a frozen copy of the base (full, freeze), sharded like the policy under fsdp."""
        if job.preference is None:
            return None
        from raylm import methods
        from raylm.train.preference import Preference, adapters_off, frozen_copy

        switch = methods.reference(job.method.name)
        if not job.preference.uses_reference or job.preference.precompute_reference:
            return Preference(job.preference, None)
        if switch is not None:
            return Preference(job.preference, adapters_off(switch))
        return Preference(
            job.preference, frozen_copy(_reference_copy(job, tokenizer, device, engine, config))
        )

    def worker_rebuild(self, job: FinetuneJob, tokenizer):
        """A fresh base-plus-method model on the CPU, for gathering fsdp / ZeRO-3 shards into."""

        def rebuild():
            import torch

            from raylm import methods

            return methods.apply(base_model(job, tokenizer, torch.device("cpu")), job.method, tokenizer)

        return rebuild

    def worker_export(self, final, tokenizer, stage: Path, config: dict, job: FinetuneJob) -> dict:
        return export(final, tokenizer, stage, config, job)


def _reference_copy(job: FinetuneJob, tokenizer, device, engine, config: dict):
    """A frozen copy of the starting model for full / freeze preference runs, held like the policy:
    sharded under fsdp and partitioned under ZeRO-3 (complete on rank 0 only while sharding), whole on
    each rank otherwise, in the policy's dtype."""
    import torch
    from pydantic import TypeAdapter

    from raylm.spec.strategies import StrategySpec
    from raylm.train.preference import without_dropout

    plan = TypeAdapter(StrategySpec).validate_python(config["strategy"])
    sharded = config["sharded"]  # fsdp, ZeRO-3: rank 0 builds it whole, the others its structure
    copy = base_model(job, tokenizer, torch.device("cpu") if sharded else device, config["empty"])
    copy.requires_grad_(False)
    if job.preference.disable_dropout:
        without_dropout(copy)
    if plan.name == "fsdp":
        from raylm.train.strategies import fsdp

        options = fsdp.options_of(plan, job.train, device)
        fsdp.shard_from_rank0(copy, options, plan, job.train, device, master=False)
        return copy
    if sharded:
        from raylm.train.strategies import deepspeed

        return deepspeed.frozen_zero3(copy, plan, job.train, device)
    return copy.to(device=device, dtype=next(engine.module.parameters()).dtype)


def run_finetune(kind: Finetune, job: FinetuneJob, callbacks: tuple = ()) -> dict:
    """Run `job` on the connected Ray; `callbacks`: Ray Train callbacks (a search's report to Tune)."""
    output = job.output.path
    if job.preference is not None and job.preference.precompute_reference:
        refuse_unfit_precompute(job)  # before the run folder or the tokenized data are written
    local_output = prepare_run(job)
    tokenizer, records, where, splits = prepare_data(job)
    held = held_out_pairs(job, tokenizer, records)
    total_steps = planned_steps(job, splits["train"]["rows"])
    strategy, why = resolve_strategy(job)
    reference = None
    if job.preference is not None and job.preference.precompute_reference:
        from raylm.train.reference import precompute

        reference = precompute(job, tokenizer, where, splits)
    announce(job, strategy, why, total_steps, f"method {job.method.name}")
    result, outcome = fit(
        kind,
        job,
        local_output,
        {
            "tokenizer": tokenizer,
            "total_steps": total_steps,
            "strategy": strategy,
            "held_out": held,
            "data": {"where": where, "splits": splits, "reference": reference},
        },
        callbacks,
    )
    from raylm.methods import artifact_dir

    summary = {
        **base_summary(job, total_steps, result, outcome, strategy, why),
        "method": job.method.model_dump(),
        "artifact": f"{output.rstrip('/')}/{artifact_dir(job.method.name)}",
        **{
            k: outcome[k]
            for k in ("parameters", "artifact_bytes", "peak_memory", "exact_match_before", "exact_match")
            if k in outcome
        },
    }
    if job.output.merge:
        summary["merged"] = f"{output.rstrip('/')}/merged"
    finish(job, local_output, summary, outcome)
    return summary


def refuse_unfit_precompute(job: FinetuneJob) -> None:
    """Stop before any work where the precomputed reference would not fit one worker: its tasks hold
    the whole starting model each, which a large model trained sharded would not survive."""
    from raylm.planning.plan import precompute_reason, worker_memory

    reason = precompute_reason(job, worker_memory(job))
    if reason is None:
        return
    live = (
        "the live reference is the trained model with its adapters off: no second copy"
        if not job.trains_base_weights
        else "a live reference is sharded like the model under fsdp or ZeRO-3"
    )
    raise SpecError([("preference.precompute_reference", f"{reason}: set it to false ({live})")])


def prepare_data(job: FinetuneJob):
    """The tokenizer, the examples, and where their tokenized splits are (written now unless a cache
    of the same inputs and settings exists): (tokenizer, records, where, splits)."""
    from raylm.data.tokenizer import load_tokenizer

    rows = _rows_module(job)
    tokenizer = load_tokenizer(
        job.tokenizer.path or job.model.path, job.model.revision, job.model.trust_remote_code
    )
    records = rows.examples(job.data)
    where, manifest = tokenized(job, tokenizer, lambda: rows.token_rows(records, tokenizer, job.data))
    splits = manifest["splits"]
    if splits["train"]["rows"] == 0:
        why = (
            "every pair's chosen answer equals its rejected one, or"
            if job.data.format == "preference"
            else "check"
        )
        raise SpecError(
            [("data", f"no training example left after tokenization: {why} the fields and data.seq_len")]
        )
    if job.data.val_fraction > 0 and splits["val"]["rows"] == 0:
        raise SpecError(
            [("data.val_fraction", "no example landed in the validation split: raise it or add data")]
        )
    return tokenizer, records, where, splits


def held_out_pairs(job: FinetuneJob, tokenizer, records) -> list[tuple[list[int], str]]:
    """(prompt ids, answer) of the held-out examples that exact match answers."""
    from raylm.data.sft import prompt_ids

    return [
        (prompt_ids(prompt, tokenizer), answer)
        for prompt, answer in _rows_module(job).held_out(
            records, tokenizer, job.data, job.eval.exact_match_examples
        )
    ]


def _rows_module(job: FinetuneJob):
    """How the examples become token rows: supervised (raylm.data.sft) or preference data."""
    if job.data.preference:
        from raylm.data import preference

        return preference
    from raylm.data import sft

    return sft


def export(final, tokenizer, stage: Path, config: dict, job: FinetuneJob) -> dict:
    """The method's artifact (and merged model), exact match after training, sizes and peak memory."""
    import resource

    import torch

    from raylm import methods
    from raylm.planning.models import count_parameters
    from raylm.train.exact_match import exact_match

    method = methods.module(job.method.name)
    name = methods.artifact_dir(job.method.name)

    def write(folder: Path) -> None:
        method.save(final, folder)
        tokenizer.save_pretrained(folder)
        (folder / "raylm_method.json").write_text(
            json.dumps(
                {"method": job.method.model_dump(), "base": job.model._source or job.model.path}, indent=2
            )
        )

    storage.export_dir(stage, name, write, config["publish_to"])
    artifact_bytes = sum(p.stat().st_size for p in (stage / name).rglob("*.safetensors"))
    trainable, total = count_parameters(final)
    after = (
        exact_match(final, tokenizer, config["held_out"], job.eval.max_new_tokens)
        if config["held_out"]
        else {}
    )
    if job.output.merge:
        merged = method.merge(final)

        def write_merged(folder: Path) -> None:
            save_pretrained(merged, folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)

        storage.export_dir(stage, "merged", write_merged, config["publish_to"])
    on_gpu = torch.cuda.is_available() and next(final.parameters()).is_cuda
    return {
        "parameters": {"trainable": trainable, "total": total, "trainable_percent": 100 * trainable / total},
        "artifact_bytes": artifact_bytes,
        "peak_memory": (
            {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated()}
            if on_gpu
            else {"process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        ),
        "exact_match": after,
    }
