"""Driver of `kind: pretrain`: tokenizer -> Ray Data pipeline -> Ray Train TorchTrainer -> summary.

    raylm run jobs/quickstart.yaml
    raylm run jobs/quickstart.yaml --set train.max_steps=50 --set output=runs/smoke

Re-running a spec with the same output resumes from its latest checkpoint (Ray Train restores the
run from `<output>/checkpoints`); `failure.max_failures` restarts failed workers from it.
"""

from __future__ import annotations

from pathlib import Path

from raylm.runtime import storage
from raylm.spec.jobs import PretrainJob
from raylm.spec.reading import SpecError
from raylm.spec.sections import TokenizerTraining
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

SAMPLE_PROMPT_TOKENS = 8


class Pretrain:
    """kind: pretrain (a raylm.kinds.TrainingKind)."""

    def preflight(self, job: PretrainJob) -> list[tuple[str, str]]:
        from raylm.data.pipeline import check_data
        from raylm.runtime.preflight import check_training_inputs

        return check_data(job.data) + check_training_inputs(job)

    def run(self, job: PretrainJob) -> dict:
        return run_pretrain(self, job)

    # ---- on each worker (raylm.train.loop calls these) -----------------------------------------

    def worker_model(self, job: PretrainJob, tokenizer, device, rank: int, config: dict):
        """A new model of the architecture (or the given folder's weights), seeded identically on all
        ranks; only its structure on the ranks a sharded strategy fills from rank 0 (`config["empty"]`)."""
        from raylm.planning.models import build_model

        model = build_model(
            job.model, len(tokenizer), tokenizer=tokenizer, seed=job.train.seed, empty=config["empty"]
        )
        if job.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, {}

    def worker_optimizer(self, job: PretrainJob):
        return None  # AdamW

    def worker_objective(self, job: PretrainJob, tokenizer, device, engine, config: dict):
        return None  # the causal-LM loss

    def worker_rebuild(self, job: PretrainJob, tokenizer):
        return None  # gather into a model built from the config

    def worker_export(self, final, tokenizer, stage: Path, config: dict, job: PretrainJob) -> dict:
        """The final Hugging Face folder `model/`, and a greedy sample from the start of a corpus block."""
        from raylm.train.exact_match import greedy_sample

        sample = greedy_sample(final, tokenizer, config["sample_prompt"])
        storage.export_model(final, tokenizer, stage, config["publish_to"])
        return {"sample": sample}


def run_pretrain(kind: Pretrain, job: PretrainJob) -> dict:
    from raylm.data.pipeline import documents, packed_blocks
    from raylm.train.reader import CachedSplit

    output = job.output.path
    local_output = prepare_run(job)

    docs = documents(job.data)
    tokenizer = prepare_tokenizer(job, docs, local_output)
    where, manifest = tokenized(
        job, tokenizer, lambda: packed_blocks(docs, tokenizer, job.data), val_limit=job.data.val_blocks
    )
    splits = manifest["splits"]
    if splits["train"]["rows"] == 0:
        raise SpecError(
            [
                (
                    "data",
                    f"the corpus gave no training block of data.seq_len={job.data.seq_len} tokens after "
                    "tokenization: add text or lower data.seq_len",
                )
            ]
        )
    if job.data.val_fraction > 0 and splits["val"]["rows"] == 0:
        raise SpecError(
            [("data.val_fraction", "no block landed in the validation split: raise val_fraction or add text")]
        )
    total_steps = planned_steps(job, splits["train"]["rows"])
    first = CachedSplit(where, "train", splits["train"]).read(0, 1)["input_ids"][0]
    strategy, why = resolve_strategy(job)
    announce(job, strategy, why, total_steps, f"vocab {len(tokenizer)}")
    result, outcome = fit(
        kind,
        job,
        local_output,
        {
            "tokenizer": tokenizer,
            "total_steps": total_steps,
            "strategy": strategy,
            "sample_prompt": first[:SAMPLE_PROMPT_TOKENS].tolist(),
            "data": {"where": where, "splits": splits},
        },
    )
    summary = {
        **base_summary(job, total_steps, result, outcome, strategy, why),
        "model": f"{output.rstrip('/')}/model",
        "sample": outcome.get("sample", {}),
    }
    finish(job, local_output, summary, outcome)
    return summary


def prepare_tokenizer(job: PretrainJob, docs, local_output: Path | None):
    """The run's tokenizer: the one saved by an earlier attempt of this run, a given one, or a new one."""
    from raylm.data.pipeline import corpus_sample
    from raylm.data.tokenizer import load_tokenizer, train_tokenizer

    saved = local_output / "tokenizer" if local_output else None
    if saved is not None and (saved / "tokenizer_config.json").exists():
        return load_tokenizer(str(saved))
    source = job.tokenizer.path or (job.model.path if job.tokenizer.train is None else None)
    if source is not None:
        tokenizer = load_tokenizer(source, job.model.revision, job.model.trust_remote_code)
    else:
        how = job.tokenizer.train or TokenizerTraining()
        print(f"[raylm] training a {how.type} tokenizer on the corpus", flush=True)
        tokenizer = train_tokenizer(
            corpus_sample(docs, how.max_chars), how.type, how.vocab_size, how.min_frequency
        )
    if saved is not None:
        saved.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(saved)
    return tokenizer
