"""`preference.precompute_reference: true`: the reference model's log-probabilities, computed once
before training, so that training holds one model.

    folder = precompute(job, tokenizer, where, splits)    # on the driver, before the fit
    CachedSplit(where, "train", info, extra=load(folder, "train", rows))   # on each worker

The reference is the starting model (the model spec's weights, loaded the method's own way: QLoRA's
4-bit base), without dropout or gradients, in the training precision. `resources.num_workers` Ray
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

import numpy as np

VERSION = 1


def key(job) -> str:
    from raylm.runtime import storage

    loading = job.method.model_dump() if job.method.name == "qlora" else {}
    identity = {
        "version": VERSION,
        "model": storage.fingerprint(job.model.path) or job.model.path,
        "revision": job.model.revision,
        "dtype": job.model.dtype,
        "precision": job.train.precision,
        "loading": loading,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def precompute(job, tokenizer, where: str, splits: dict) -> str:
    """The folder of the reference log-probabilities of the cache at `where` (computed now unless a
    complete one is there)."""
    import ray

    from raylm.data.sources import filesystem

    folder = f"{where.rstrip('/')}/reference-{key(job)}"
    fs, root = filesystem(folder)
    import pyarrow.fs as pafs

    if fs.get_file_info(f"{root}/done").type == pafs.FileType.File:
        print(f"[raylm] reusing the reference log-probabilities in {folder}", flush=True)
        return folder
    resources = job.resources
    task = ray.remote(
        num_cpus=resources.cpus_per_worker, num_gpus=1 if resources.use_gpu else 0, max_retries=1
    )(reference_logps)
    workers = max(1, resources.num_workers)
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
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root}/{split}.npy") as out:
            out.write(buffer.getvalue())
    with fs.open_output_stream(f"{root}/done") as out:
        out.write(b"")
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

    from raylm.runtime import storage
    from raylm.train.base_model import base_model
    from raylm.train.preference import answer_logps, without_dropout
    from raylm.train.reader import CachedSplit, to_longest
    from raylm.train.strategies import autocast

    problems = storage.localize_inputs(job)
    if problems:
        raise RuntimeError("; ".join(f"{field}: {message}" for field, message in problems))
    device = torch.device("cuda" if job.resources.use_gpu and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, int(job.resources.cpus_per_worker)))
    model = base_model(job, tokenizer, device)
    if not getattr(model, "is_loaded_in_4bit", False):  # QLoRA's base is loaded onto the device
        model = model.to(device)
    model.eval()
    without_dropout(model)
    cached = CachedSplit(where, split, info)
    out = []
    step = job.train.batch_size
    with torch.no_grad(), autocast(job.train.precision, device) or contextlib.nullcontext():
        for lo in range(start, stop, step):
            rows = cached.read(lo, min(lo + step, stop))
            batch = {k: torch.from_numpy(v).long().to(device) for k, v in rows.items()}
            out.append(answer_logps(model, to_longest(batch))[0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)
