"""Resumable training checkpoints: weights (safetensors), optimizer, scheduler, RNG and loop position.

Each worker writes its part into a fresh local folder and hands it to `ray.train.report`, which
copies the parts of all workers into one `checkpoint_*` folder on the run's storage and registers it
only once every part has arrived: a crash while saving never replaces the last good checkpoint.
`MANIFEST.json` (rank 0) lists every file with its size, and loading refuses a folder that does not
match it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

MANIFEST = "MANIFEST.json"


class CheckpointError(Exception):
    pass


def unwrap(model):
    """The plain model inside a DDP / FSDP wrapper."""
    return getattr(model, "module", model)


def save(directory: Path, model, optimizer, scheduler, loop_state: dict, rank: int) -> None:
    """Write this rank's part of a checkpoint into `directory`."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank != 0:
        return
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    save_file(_untie(state), directory / "model.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    (directory / "loop_state.json").write_text(json.dumps(loop_state))
    files = {
        p.name: p.stat().st_size
        for p in directory.iterdir()
        if p.name.startswith(("model", "optimizer", "scheduler", "loop"))
    }
    (directory / MANIFEST).write_text(json.dumps({"files": files, "world_size": loop_state["world_size"]}))


def _untie(state: dict) -> dict:
    """safetensors refuses tensors that share memory (tied embeddings): store a copy of each alias."""
    seen: dict[int, str] = {}
    out = {}
    for key, tensor in state.items():
        ptr = tensor.data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.setdefault(ptr, key)
    return out


def load(directory: Path, model, optimizer, scheduler, rank: int) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from `directory`; returns the loop state."""
    import torch
    from safetensors.torch import load_file

    verify(directory)
    unwrap(model).load_state_dict(load_file(directory / "model.safetensors"), strict=True)
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((directory / "loop_state.json").read_text())


def verify(directory: Path) -> None:
    manifest_file = directory / MANIFEST
    if not manifest_file.exists():
        raise CheckpointError(f"{directory}: no {MANIFEST}; the checkpoint is incomplete")
    manifest = json.loads(manifest_file.read_text())
    for name, size in manifest["files"].items():
        path = directory / name
        if not path.exists() or path.stat().st_size != size:
            raise CheckpointError(
                f"{directory}: {name} is missing or truncated; the checkpoint is incomplete"
            )


def _rng_state() -> dict:
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": pos,
        "gauss": [has_gauss, cached],
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    saved = state["numpy"]
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state((saved["name"], keys, saved["pos"], saved["gauss"][0], saved["gauss"][1]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
