"""The per-worker training loop, top to bottom: setup -> resume -> train/eval/checkpoint -> export.

Ray Train runs `train_loop(config)` on every worker; `config["kind"]` is the job kind's driver
(a raylm.kinds.TrainingKind), which supplies what differs by kind: `worker_model` (what trains),
`worker_optimizer` and `worker_rebuild` (None: AdamW, and a model built from the config for gathering
shards into) and `worker_export` (what the run leaves behind).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import tempfile
import time
from pathlib import Path

from pydantic import TypeAdapter

from raylm.spec.strategies import StrategySpec
from raylm.train.preference import is_preference


def train_loop(config: dict) -> dict | None:
    import ray.train
    import torch

    from raylm.methods.hf_peft import silence_peft
    from raylm.runtime import startup_gc, storage
    from raylm.train import checkpoint, hostmem, metrics, preemption, strategies
    from raylm.train.metrics import MetricsLog, emit
    from raylm.train.preference import preference_row
    from raylm.train.reader import CachedSplit, TrainShard, to_longest, val_batches

    # ---- setup -------------------------------------------------------------------------------
    job, kind = config["job"], config["kind"]
    storage.localize_inputs_here(job)  # inputs named by a storage URI: this node's copies
    spec, tokenizer = job.train, config["tokenizer"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if rank == 0:  # rank 0's lines (the method's parameter count, ...) go to the driver's console
        metrics.connect(config.get("console"))
    torch.set_num_threads(max(1, int(job.resources.cpus_per_worker)))
    device = ray.train.torch.get_device()
    silence_peft()  # PEFT reading transformers' deprecated property: nothing for a raylm user to change
    if device.type == "cpu":  # DeepSpeed (imported by transformers' integrations) need not guess
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    def every_rank(value) -> list:
        """`value` of every rank, in rank order (a collective: every rank calls it)."""
        values = [value] * world
        if world > 1:
            torch.distributed.all_gather_object(values, value)
        return values

    nodes = every_rank(ray.get_runtime_context().get_node_id())

    total_steps = config["total_steps"]
    plan = TypeAdapter(StrategySpec).validate_python(config["strategy"])  # `auto` is resolved by now
    # fsdp, ZeRO-3: one full copy on rank 0's host, the structure only on the other ranks
    sharded = strategies.fills_from_rank0(plan)
    config = {**config, "sharded": sharded, "empty": rank != 0 and sharded}
    import_model_code(job, plan)  # so that the host memory measured next is the model's, not code's
    startup_gc.after_startup()  # imports done: Python's collection thresholds while tensors live
    host_start = hostmem.reset_peak()
    model, before = kind.worker_model(job, tokenizer, device, rank, config)
    model.config.use_cache = False
    engine = strategies.setup(
        model,
        plan,
        spec,
        total_steps,
        device,
        make_optimizer=kind.worker_optimizer(job),
        rebuild=kind.worker_rebuild(job, tokenizer),
    )
    # None: the causal-LM / T-Few loss
    engine.objective = kind.worker_objective(job, tokenizer, device, engine, config)
    if spec.keep_sparsity:  # masks of the starting weights' zeros, from each rank's own shard
        from raylm.train.masks import SparsityMasks

        engine.masks = SparsityMasks(engine.module)
        held = every_rank(engine.masks.pruned)
        if rank == 0:
            held_at_zero = sum(held) if sharded else held[0]
            emit(
                f"[raylm] keep_sparsity: {held_at_zero:,} zero weights of the decoder's linear layers stay zero"
            )
    if spec.compile:
        engine.compile()
    # what building, loading and sharding the model added to each rank's host memory at its peak
    load_memory = every_rank(hostmem.peak() - host_start if host_start is not None else None)

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
            # Elastic resize: the position is global (micro-batches of the epoch's order), so the new
            # group continues exactly where the old one stopped.
            loop["resized_from"], loop["world_size"] = loop["world_size"], world
    else:
        torch.manual_seed(spec.seed + rank)
    resumed_from = loop["step"] if restored is not None else 0
    stage = Path(config["stage_dir"]) if config["stage_dir"] else storage.stage_dir(config["publish_to"])
    if rank == 0 and config["publish_to"] and restored is not None:
        storage.fetch_file(config["publish_to"], "metrics.jsonl", stage)  # the log so far, to append to
    log = None
    if rank == 0:
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
    data = config["data"]
    extra = {"train": {}, "val": {}}
    if data.get("reference"):  # precomputed reference log-probabilities (raylm/train/reference.py)
        from raylm.train.reference import load

        extra = {s: {"reference": load(data["reference"], s, data["splits"][s]["rows"])} for s in extra}
    shard = TrainShard(
        CachedSplit(data["where"], "train", data["splits"]["train"], extra["train"]),
        rank,
        world,
        spec.batch_size,
        job.data.shuffle_buffer,
        spec.seed,
        getattr(job.data, "group_by_length", False),
    )
    val_split = CachedSplit(data["where"], "val", data["splits"]["val"], extra["val"])
    first_token_labelled = predicts_first_token(engine.module)
    held_out = config.get("held_out") or []  # (prompt ids, answer) pairs of a fine-tuning kind
    evaluation = getattr(job, "eval", None)
    answer_during_training = bool(held_out) and evaluation is not None and evaluation.during_training
    max_new_tokens = evaluation.max_new_tokens if evaluation is not None else 0

    def on_device(rows: dict) -> dict:
        batch = {
            k: torch.from_numpy(v) if v.dtype.kind == "f" else torch.from_numpy(v).long()
            for k, v in rows.items()
        }
        return {k: v.to(device) for k, v in (to_longest(batch) if dynamic_padding else batch).items()}

    def answered() -> list[float]:
        """(right answers, answered) over this rank's share of the held-out prompts: every rank
        answers its own, in lockstep (under fsdp / ZeRO-3 a forward pass is a collective)."""
        from raylm.train.exact_match import exact_match_share

        with engine.generating(), engine.autocast or contextlib.nullcontext():
            return list(exact_match_share(engine.module, tokenizer, held_out, rank, world, max_new_tokens))

    def evaluate() -> dict:
        """Validation loss (of the response / right choice tokens) and, for choices data, accuracy."""
        from raylm.train.objectives import choices_eval

        engine.model.eval()
        # summed NLL, tokens, right picks, examples, right answers, answered; for preference data the
        # objective's sums (raylm.train.preference.Preference.evaluate) after them (on the device: NCCL
        # reduces only GPU tensors)
        totals = torch.zeros(13, dtype=torch.float64, device=device)
        with torch.no_grad():
            for rows in val_batches(val_split, rank, world, spec.batch_size, spec.eval_batches):
                batch = on_device(rows)
                if is_preference(batch):
                    with engine.autocast or contextlib.nullcontext():
                        totals[6:] += torch.tensor(
                            engine.objective.evaluate(engine.model, batch), dtype=torch.float64, device=device
                        )
                    continue
                if "answer" in batch:
                    with engine.autocast or contextlib.nullcontext():
                        totals[:4] += torch.tensor(
                            choices_eval(engine.model, batch), dtype=torch.float64, device=device
                        )
                    continue
                n = labelled(batch, first_token_labelled)
                # every rank runs the forward, labelled tokens or not: under fsdp and ZeRO-3 it gathers
                # the weights together with the other ranks, which would otherwise wait forever
                loss = engine.loss(batch, items=torch.tensor(float(max(n, 1)), device=device))
                totals[:2] += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=device)
            if answer_during_training:
                totals[4:6] += torch.tensor(answered(), dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(totals)
        engine.model.train()
        if totals[7] > 0:
            row = preference_row(totals[6:].tolist())
        else:
            val_loss = (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")
            row = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if totals[3] > 0:
            row["val_accuracy"] = (totals[2] / totals[3]).item()
        if totals[5] > 0:
            row["exact_match"] = (totals[4] / totals[5]).item()
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

    # SIGTERM reaches one worker (raylm.train.preemption); every rank learns of it from a one-number
    # all-reduce at each step on a host-side (gloo) group, so a GPU run gains no device sync for it.
    stop_group = torch.distributed.new_group(backend="gloo") if world > 1 else None

    def told_to_stop() -> bool:
        flag = torch.tensor([float(preemption.received())])
        if world > 1:
            torch.distributed.all_reduce(flag, group=stop_group)
        return flag.item() > 0

    # Ray's own notice: a node of this run is draining (KubeRay / the autoscaler reclaiming it, with a
    # deadline). One checkpoint at once, then training goes on: Ray Train restarts the run from it when
    # the node goes (FailureConfig.max_preemption_failures, unlimited by default). Every rank asks at
    # every step (the call is a barrier).
    drain_checkpointed = False

    def steps():
        """Each optimizer step's micro-batches, epoch after epoch, from the saved position on."""
        group = []
        while True:
            for j, rows in shard.epoch(loop["epoch"], loop["batches_in_epoch"]):
                # every worker reads its micro-batch of this round: the position moves past all of them
                loop["batches_in_epoch"] = j - rank + world
                group.append(rows)
                if len(group) == spec.grad_accum:
                    yield group
                    group = []
            loop["epoch"] += 1
            loop["batches_in_epoch"] = 0

    if held_out and restored is None:  # exact match before training, the same way as during it
        engine.model.eval()
        with torch.no_grad():
            right = torch.tensor(answered(), dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(right)
        before["exact_match_before"] = {
            "exact_match": (right[0] / right[1]).item(),
            "examples": int(right[1]),
        }

    # ---- train -------------------------------------------------------------------------------
    engine.model.train()
    # summed token losses and labelled tokens since the last row
    window = torch.zeros(2, dtype=torch.float64, device=device)
    window_tokens = 0
    window_start = time.perf_counter()
    # The whole attempt's throughput: every token over the training time, epoch boundaries and data
    # waits included, evaluation and checkpointing not (the progress windows also leave out logging).
    run_start, paused, tokens_at_start = time.perf_counter(), 0.0, loop["tokens"]
    last_row: dict = {}
    evaluation_keys: set[str] = set()  # what evaluate() measures (val_loss, val_ppl, accuracy ...)
    for group in steps() if loop["step"] < total_steps else ():
        batches = [on_device(rows) for rows in group]
        # The loss is the mean over every labelled token of the global batch (all micro-batches, all
        # ranks): one all-reduce of the count per step gives each rank its divisor.
        count = torch.tensor(float(sum(labelled(b, first_token_labelled) for b in batches)), device=device)
        if world > 1:
            torch.distributed.all_reduce(count)
        items = count.clamp(min=1) / world
        stopping = told_to_stop()  # a worker got SIGTERM: this step is the attempt's last (checkpointed)
        draining = not drain_checkpointed and ray.train.get_preemption_info() is not None
        drain_checkpointed |= draining
        for i, batch in enumerate(batches):
            window[0] += engine.micro_step(batch, items, boundary=i == len(batches) - 1)
        window[1] += count.double() / world  # a tensor op: no wait for the device
        step_tokens = sum(real_tokens(b) for b in batches) * world  # this rank's count stands for all
        loop["step"] += 1
        loop["tokens"] += step_tokens
        window_tokens += step_tokens
        step, done = loop["step"], loop["step"] >= total_steps
        row: dict = {}
        if step % spec.log_every == 0 or done:
            if world > 1:
                torch.distributed.all_reduce(window)  # the global loss, not rank 0's
            elapsed = time.perf_counter() - window_start
            row.update(
                loss=(window[0] / window[1].clamp(min=1)).item(),
                lr=engine.lr,
                tokens_per_s=window_tokens / elapsed,
                tokens=loop["tokens"],
            )
            window.zero_()
            window_tokens = 0
        evaluated = step % spec.eval_every == 0 or done
        if evaluated:
            started = time.perf_counter()
            evaluation = evaluate()
            evaluation_keys.update(evaluation)
            row.update(evaluation)
            paused += time.perf_counter() - started
        if row:
            row["step"] = step
            last_row.update(row)
            if rank == 0:
                log.write(row)
                metrics.progress(row, total_steps)
        if step % spec.checkpoint_every == 0 or done or stopping or draining:
            started = time.perf_counter()
            # an evaluation's values go to Ray Train (Tune's schedulers) at its own step only, never
            # again with a later checkpoint as if they were measured there
            fresh = {k: v for k, v in last_row.items() if evaluated or k not in evaluation_keys}
            save_and_report({**fresh, "step": step, "epoch": loop["epoch"]})
            paused += time.perf_counter() - started
        elif evaluated:
            # Only evaluations go to Ray Train (Tune's schedulers read them): a report is a barrier
            # across the workers and waits for the controller to take the previous one, while the
            # progress rows already reach the log, the trackers and the console from rank 0.
            ray.train.report(row)
        if row:
            window_start = time.perf_counter()
        if stopping and not done:
            if rank == 0:  # the rows logged so far reach their files (and the bucket) before the stop
                log.close()
                if config["publish_to"]:
                    storage.publish_files(stage, config["publish_to"], ["metrics.jsonl", "tensorboard"])
            raise preemption.Preempted(
                f"a training worker received SIGTERM: checkpoint saved at step {step}; training resumes "
                "there (failure.max_failures restarts the workers, or run the spec again)"
            )
        if done:
            break

    seconds = time.perf_counter() - run_start - paused
    throughput = {
        "rows_read": shard.rows_returned,
        "tokens": loop["tokens"] - tokens_at_start,
        "seconds": seconds,
        "tokens_per_s": (loop["tokens"] - tokens_at_start) / seconds if seconds > 0 else None,
    }

    # the most host memory this attempt added since the model was built, training included
    train_memory = every_rank(hostmem.peak() - host_start if host_start is not None else None)

    # ---- export ------------------------------------------------------------------------------
    final = engine.consolidated(rank)  # collective: gathers shards of fsdp / ZeRO-3
    if rank != 0:
        drop_stage(stage, config)
        return None
    log.close()
    exported = kind.worker_export(final, tokenizer, stage, config, job)
    drop_stage(stage, config)  # a bucket run's files are in the bucket now: none stay on this disk
    return {
        "metrics": last_row,
        "worker_nodes": nodes,
        "host_memory": {"load": load_memory, "train": train_memory},
        "resumed_from": resumed_from,
        "throughput": throughput,
        "strategy": plan.model_dump(),
        **before,
        **exported,
    }


def drop_stage(stage: Path, config: dict) -> None:
    """Remove the local folder a run with a storage URI as its output wrote through (published)."""
    import shutil

    if not config["stage_dir"]:
        shutil.rmtree(stage, ignore_errors=True)


def real_tokens(batch: dict) -> int:
    """Tokens in a batch, padding not counted."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def labelled(batch: dict, first_token: bool = False) -> int:
    """What the loss averages over: labelled positions after the shift (all but the first; with
    `first_token`, for prompt and P-tuning, whose last virtual token predicts it, the first too),
    or for choices and preference batches the examples."""
    if "answer" in batch or is_preference(batch):  # choices, preference examples
        return len(batch["input_ids"])
    labels = batch.get("labels", batch["input_ids"])
    if "labels" not in batch:
        return labels.numel() - (0 if first_token else labels.shape[0])
    return int((labels[:, 0 if first_token else 1 :] != -100).sum())


def predicts_first_token(module) -> bool:
    """True for PEFT methods that put virtual tokens before the input (prompt tuning, P-tuning)."""
    config = getattr(module, "active_peft_config", None)
    return bool(config and config.is_prompt_learning and config.peft_type.value != "PREFIX_TUNING")


def import_model_code(job, plan) -> None:
    """Import what building the job's model imports (its modelling module, PEFT for a fine-tuning
    method, the sharding code, DeepSpeed under a DeepSpeed plan), by building its structure on the
    meta device: no weights, no memory. (PEFT, with bitsandbytes behind it, takes seconds to import:
    only a job with a method needs it; DeepSpeed's import alone adds ~140 MiB of resident code and
    tables to a process, which is not the model's memory.)"""
    if getattr(job, "method", None) is not None:
        import peft  # noqa: F401
    if plan.name == "deepspeed":
        import deepspeed  # noqa: F401
        import deepspeed.runtime.zero.stage3  # noqa: F401
        import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401

        # and what deepspeed.initialize imports at its first call (~35 MiB of module objects in a CPU
        # worker): its Muon optimizer, whose import runs torch.compile (dynamo, functorch, networkx); its
        # expert-parallel presets; its op builders (setuptools, distutils)
        for name in (
            "deepspeed.runtime.zero.muon.muon_optimizer",
            "deepspeed.module_inject.auto_ep_layer",
            "deepspeed.ops.op_builder.all_ops",
        ):
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    from raylm.planning.models import meta_model, model_config

    # best effort: a model whose structure cannot be built on meta is simply built as usual next
    with contextlib.suppress(Exception):
        meta_model(model_config(job))


def _describe(plan) -> str:
    fields = {k: v for k, v in plan.model_dump().items() if k not in ("name", "config") and v is not None}
    return ", ".join(f"{k}={v}" for k, v in fields.items()) or "defaults"
