"""`preference.precompute_reference: true`: the reference model's log-probabilities, computed once
before training, so that training holds one model.

    folder = precompute(job, tokenizer, where, splits)    # on the driver, before the fit
    CachedSplit(where, "train", info, extra=load(folder, "train", rows))   # on each worker

The reference is the starting model, as the live reference computes it: for an adapter method the
model with its adapters switched off (QLoRA's 4-bit base with its k-bit preparation), for full and
freeze the model spec's weights; without dropout or gradients, in the training precision. `resources.num_workers` Ray
tasks, each with a training worker's CPUs and GPU, read consecutive row ranges of each split straight
from the tokenized cache and return the summed log-probabilities of every row's two answers. They are
stored beside the cache: `<cache>/reference-<key>/{train,val}.npy` (float32 [rows, 2]) and a `done`
marker written last, under a key of the model's identity (its files' names, sizes and times), the
method's way of loading it and the precision, so a later run or a resumed one reads them again and a
changed model never reads stale ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid

import numpy as np

VERSION = 1


def key(job) -> str:
    """What the values depend on besides the tokenized rows (their cache folder holds this one): the
    model's files, how they load (the method, QLoRA's quantisation too), the precision and the seed
    (rows a larger tokenizer adds to the embeddings start from it)."""
    from raylm.runtime import storage

    model = job.model.model_dump(mode="json")
    identity = {
        "version": VERSION,
        "files": storage.fingerprint(job.model.path) or job.model.path,
        "model": model,
        "method": job.method.model_dump(mode="json"),
        "precision": job.train.precision,
        "seed": job.train.seed,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def precompute(job, tokenizer, where: str, splits: dict) -> str:
    """The folder of the reference log-probabilities of the cache at `where` (computed now unless a
    complete one is there)."""
    import pyarrow.fs as pafs
    import ray

    from raylm.data.sources import filesystem

    folder = f"{where.rstrip('/')}/reference-{key(job)}"
    fs, root = filesystem(folder)

    def complete() -> bool:
        return fs.get_file_info(f"{root}/done").type == pafs.FileType.File

    if complete():
        print(f"[raylm] reusing the reference log-probabilities in {folder}", flush=True)
        return folder
    resources = job.resources
    task = ray.remote(
        num_cpus=resources.cpus_per_worker, num_gpus=1 if resources.use_gpu else 0, max_retries=1
    )(reference_logps)
    workers = resources.max_workers
    # A local folder is written beside its place and moved in (a search's trials share the cache and
    # may compute the same values at once: none reads a half-written file); an object store's writes
    # are whole objects, `done` last.
    in_place = not isinstance(fs, pafs.LocalFileSystem)
    target = root if in_place else f"{root}.incoming-{uuid.uuid4().hex[:8]}"
    for split, info in splits.items():
        rows = info["rows"]
        bounds = np.linspace(0, rows, workers + 1).astype(int)
        parts = ray.get(
            [
                task.remote(job, tokenizer, where, split, info, int(lo), int(hi))
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
                if hi > lo
            ]
        )
        values = np.concatenate(parts) if parts else np.zeros((0, 2), np.float32)
        buffer = io.BytesIO()
        np.save(buffer, values.astype(np.float32))
        fs.create_dir(target, recursive=True)
        with fs.open_output_stream(f"{target}/{split}.npy") as out:
            out.write(buffer.getvalue())
    with fs.open_output_stream(f"{target}/done") as out:
        out.write(b"")
    if not in_place:
        try:
            fs.move(target, root)
        except OSError:  # another run moved its copy in first
            if not complete():
                raise
            fs.delete_dir(target)
    print(f"[raylm] reference log-probabilities of {', '.join(splits)} written to {folder}", flush=True)
    return folder


def load(folder: str, split: str, rows: int) -> np.ndarray:
    from raylm.data.sources import filesystem

    fs, root = filesystem(folder)
    with fs.open_input_file(f"{root}/{split}.npy") as handle:
        values = np.load(io.BytesIO(handle.read()))
    if values.shape != (rows, 2):
        raise RuntimeError(f"{folder}/{split}.npy holds {values.shape[0]} rows, the split {rows}")
    return values


def reference_logps(job, tokenizer, where: str, split: str, info: dict, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a split: the starting model's summed log-probabilities of both answers."""
    import contextlib

    import torch

    from raylm import methods
    from raylm.runtime import startup_gc, storage
    from raylm.train.base_model import base_model
    from raylm.train.preference import answer_logps, without_dropout
    from raylm.train.reader import CachedSplit, to_longest
    from raylm.train.strategies import autocast

    startup_gc.after_startup()  # Python's collection thresholds while the model's tensors live
    storage.localize_inputs_here(job)
    device = torch.device("cuda" if job.resources.use_gpu and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, int(job.resources.cpus_per_worker)))
    model = base_model(job, tokenizer, device)
    if not getattr(model, "is_loaded_in_4bit", False):  # QLoRA's base is loaded onto the device
        model = model.to(device)
    # an adapter method's reference is what the live one is: its model (QLoRA's k-bit preparation
    # included) with the adapters switched off
    switch = methods.reference(job.method.name)
    if switch is not None:
        model = methods.apply(model, job.method, tokenizer)
    model.eval()
    without_dropout(model)
    cached = CachedSplit(where, split, info)
    out = []
    step = job.train.batch_size
    off = switch(model) if switch is not None else contextlib.nullcontext()
    with torch.no_grad(), off, autocast(job.train.precision, device) or contextlib.nullcontext():
        for lo in range(start, stop, step):
            rows = cached.read(lo, min(lo + step, stop))
            batch = {k: torch.from_numpy(v).long().to(device) for k, v in rows.items()}
            out.append(answer_logps(model, to_longest(batch))[0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)
