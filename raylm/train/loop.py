"""The per-worker training loop, top to bottom: setup -> resume -> train/eval/checkpoint -> export.

Ray Train runs `train_loop(config)` on every worker; `config["kind"]` is the job kind's driver
(a raylm.kinds.TrainingKind), which supplies what differs by kind: `worker_model` (what trains),
`worker_optimizer` and `worker_rebuild` (None: AdamW, and a model built from the config for gathering
shards into) and `worker_export` (what the run leaves behind).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

from pydantic import TypeAdapter

from raylm.spec.strategies import StrategySpec


def train_loop(config: dict) -> dict | None:
    import ray.train
    import torch

    from raylm import storage
    from raylm.train import checkpoint, metrics, strategies
    from raylm.train.metrics import MetricsLog, emit

    # ---- setup -------------------------------------------------------------------------------
    job, kind = config["job"], config["kind"]
    spec, tokenizer = job.train, config["tokenizer"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(job.resources.cpus_per_worker)))
    device = ray.train.torch.get_device()
    # transformers' own call of its deprecated name (through PEFT): nothing for a raylm user to change
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if device.type == "cpu":  # DeepSpeed (imported by transformers' integrations) need not guess
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    nodes = [ray.get_runtime_context().get_node_id()] * world
    if world > 1:
        torch.distributed.all_gather_object(nodes, nodes[0])

    model, before = kind.worker_model(job, tokenizer, device, rank, config)
    model.config.use_cache = False
    total_steps = config["total_steps"]
    plan = TypeAdapter(StrategySpec).validate_python(config["strategy"])  # `auto` is resolved by now
    engine = strategies.setup(
        model,
        plan,
        spec,
        total_steps,
        device,
        make_optimizer=kind.worker_optimizer(job),
        rebuild=kind.worker_rebuild(job, tokenizer),
    )
    if spec.compile:
        engine.compile()

    # ---- resume ------------------------------------------------------------------------------
    loop = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "world_size": world, "tokens": 0}
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            loop = checkpoint.load(Path(folder), engine, rank)
        if loop["world_size"] != world:
            if not job.resources.elastic:  # the driver refuses this earlier; a checkpoint from elsewhere
                raise RuntimeError(
                    f"checkpoint was written by {loop['world_size']} workers, this run has {world}: "
                    "the data order cannot be replayed; set resources.num_workers back or use a new output"
                )
            # Elastic resize: the data is re-split over `world` workers; skip as many batches of the
            # current epoch as the old group consumed in total (the order within it is not replayed).
            loop["batches_in_epoch"] = loop["batches_in_epoch"] * loop["world_size"] // world
            loop["resized_from"], loop["world_size"] = loop["world_size"], world
    else:
        torch.manual_seed(spec.seed + rank)
    resumed_from = loop["step"] if restored is not None else 0
    stage = Path(config["stage_dir"]) if config["stage_dir"] else storage.stage_dir(config["publish_to"])
    if rank == 0 and config["publish_to"] and restored is not None:
        storage.fetch_file(config["publish_to"], "metrics.jsonl", stage)  # the log so far, to append to
    log = None
    if rank == 0:
        metrics.connect(config.get("console"))
        from raylm.train.tracking import metric_sinks

        sinks = metric_sinks(config["tracking"], job)
        log = MetricsLog(stage, loop["step"], job.logging.tensorboard, sinks)
    if rank == 0:
        emit(f"[raylm] {world} worker(s) on {len(set(nodes))} node(s), device {device.type}")
        if restored is not None:
            emit(f"[raylm] resumed from checkpoint at step {loop['step']}")
        if "resized_from" in loop:
            emit(f"[raylm] elastic: the checkpoint's {loop.pop('resized_from')} workers continue as {world}")
        emit(f"[raylm] strategy {plan.name}: {_describe(plan)}")

    dynamic_padding = getattr(job.data, "padding", "longest") == "longest"
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    def evaluate() -> dict:
        """Validation loss (of the response / right choice tokens) and, for choices data, accuracy."""
        from raylm.train.objectives import choices_eval

        engine.model.eval()
        totals = torch.zeros(4, dtype=torch.float64)  # summed NLL, tokens, right picks, examples
        with torch.no_grad():
            for i, batch in enumerate(
                val_shard.iter_torch_batches(batch_size=spec.batch_size, dtypes=torch.long)
            ):
                if spec.eval_batches is not None and i >= spec.eval_batches:
                    break
                batch = {
                    k: v.to(device) for k, v in (to_longest(batch) if dynamic_padding else batch).items()
                }
                if "answer" in batch:
                    with engine.autocast or contextlib.nullcontext():
                        totals += torch.tensor(choices_eval(engine.model, batch), dtype=torch.float64)
                    continue
                loss = engine.loss(batch)
                n = predicted_positions(batch)
                totals += torch.tensor([loss.item() * n, n, 0, 0], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(totals)
        engine.model.train()
        val_loss = (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")
        row = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if totals[3] > 0:
            row["val_accuracy"] = (totals[2] / totals[3]).item()
        return row

    def save_and_report(row: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as folder:
            checkpoint.save(Path(folder), engine, loop, rank)
            ray.train.report(
                row,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=f"checkpoint_{loop['step']:08d}",
            )
        if rank == 0 and config["publish_to"]:
            storage.publish_files(stage, config["publish_to"], ["metrics.jsonl", "tensorboard"])

    def micro_batches():
        """Training micro-batches forever, epoch after epoch, skipping what a resumed epoch already saw."""
        while True:
            seen = 0
            batches = train_shard.iter_torch_batches(
                batch_size=spec.batch_size,
                dtypes=torch.long,
                drop_last=True,
                # 0 means no shuffle: Ray's shuffling batcher with a zero buffer yields short batches
                local_shuffle_buffer_size=config["shuffle_buffer"] or None,
                local_shuffle_seed=spec.seed + loop["epoch"] if config["shuffle_buffer"] else None,
            )
            for batch in batches:
                seen += 1
                if seen > loop["batches_in_epoch"]:
                    loop["batches_in_epoch"] = seen
                    batch = to_longest(batch) if dynamic_padding else batch
                    yield {k: v.to(device) for k, v in batch.items()}, real_tokens(batch)
            if seen == 0:
                raise RuntimeError(
                    "the training split gave this worker no batch: add data or lower train.batch_size"
                )
            loop["epoch"] += 1
            loop["batches_in_epoch"] = 0

    # ---- train -------------------------------------------------------------------------------
    engine.model.train()
    loss_sum, micro, step_tokens = 0.0, 0, 0
    window_start, window_tokens = time.perf_counter(), 0
    # The whole attempt's throughput: every token over the training time, epoch boundaries and data
    # waits included, evaluation and checkpointing not (the progress windows also leave out logging).
    run_start, paused, tokens_at_start = time.perf_counter(), 0.0, loop["tokens"]
    last_row: dict = {}
    for batch, tokens in micro_batches() if loop["step"] < total_steps else ():
        micro += 1
        last_micro = micro % spec.grad_accum == 0
        loss_sum += engine.micro_step(batch, boundary=last_micro)
        step_tokens += tokens * world  # this rank's count stands for every rank's
        if not last_micro:
            continue
        loop["step"] += 1
        loop["tokens"] += step_tokens
        window_tokens, step_tokens = window_tokens + step_tokens, 0
        step, done = loop["step"], loop["step"] >= total_steps
        row: dict = {}
        if step % spec.log_every == 0 or done:
            steps_in_window = micro // spec.grad_accum
            elapsed = time.perf_counter() - window_start
            row.update(
                loss=loss_sum / steps_in_window,
                lr=engine.lr,
                tokens_per_s=window_tokens / elapsed,
                tokens=loop["tokens"],
            )
            loss_sum, micro, window_tokens = 0.0, 0, 0
        if step % spec.eval_every == 0 or done:
            started = time.perf_counter()
            row.update(evaluate())
            paused += time.perf_counter() - started
        if row:
            row["step"] = step
            last_row.update(row)
            if rank == 0:
                log.write(row)
                metrics.progress(row, total_steps)
        if step % spec.checkpoint_every == 0 or done:
            started = time.perf_counter()
            save_and_report({**last_row, "step": step, "epoch": loop["epoch"]})
            paused += time.perf_counter() - started
        elif row:
            ray.train.report(row)
        if row:
            window_start = time.perf_counter()
        if done:
            break

    seconds = time.perf_counter() - run_start - paused
    throughput = {
        "tokens": loop["tokens"] - tokens_at_start,
        "seconds": seconds,
        "tokens_per_s": (loop["tokens"] - tokens_at_start) / seconds if seconds > 0 else None,
    }

    # ---- export ------------------------------------------------------------------------------
    final = engine.consolidated(rank)  # collective: gathers shards of fsdp / ZeRO-3
    if rank != 0:
        return None
    log.close()
    exported = kind.worker_export(final, tokenizer, stage, config, job)
    return {
        "metrics": last_row,
        "worker_nodes": nodes,
        "resumed_from": resumed_from,
        "throughput": throughput,
        "strategy": plan.model_dump(),
        **before,
        **exported,
    }


def to_longest(batch: dict) -> dict:
    """A right-padded supervised batch cut to its longest example (dynamic padding): the positions
    removed are padding on every row (attention 0, label ignored), so the loss is unchanged."""
    mask = batch.get("attention_mask")
    if mask is None:
        return batch  # packed pretraining blocks: every position is a token
    width = int(mask.reshape(-1, mask.shape[-1]).sum(dim=1).max())
    if width == mask.shape[-1]:
        return batch
    return {k: v[..., :width] if v.ndim >= 2 else v for k, v in batch.items()}


def real_tokens(batch: dict) -> int:
    """Tokens in a batch, padding not counted."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def predicted_positions(batch: dict) -> int:
    """Tokens the loss averages over: labelled positions after the shift (all but the first)."""
    if "labels" in batch:
        return int((batch["labels"][:, 1:] != -100).sum())
    ids = batch["input_ids"]
    return ids.numel() - ids.shape[0]


def _describe(plan) -> str:
    fields = {k: v for k, v in plan.model_dump().items() if k not in ("name", "config") and v is not None}
    return ", ".join(f"{k}={v}" for k, v in fields.items()) or "defaults"
