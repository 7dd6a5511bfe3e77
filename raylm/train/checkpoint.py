"""Resumable training checkpoints: the strategy's model and optimizer state, RNG and loop position.

Each worker writes its part into a fresh local folder and hands it to `ray.train.report`, which
copies the parts of all workers into one `checkpoint_*` folder on the run's storage and registers it
only once every part has arrived: a crash while saving never replaces the last good checkpoint.
What the parts are depends on the strategy (raylm/train/engine.py): DDP writes the full weights once
(rank 0), FSDP one DCP shard per rank, DeepSpeed its ZeRO partition files. Every rank lists the files
it wrote, with their sizes, in `MANIFEST.rank<r>.json`; loading refuses a folder that does not match.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


class CheckpointError(Exception):
    pass


def save(directory: Path, engine, loop_state: dict, rank: int) -> None:
    """Write this rank's part of a checkpoint into `directory` (every rank calls this)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    engine.save(directory, rank)
    if rank == 0:
        (directory / "loop_state.json").write_text(json.dumps(loop_state))
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.startswith("MANIFEST")
    }
    (directory / f"MANIFEST.rank{rank}.json").write_text(json.dumps({"files": files}))


def load(directory: Path, engine, rank: int) -> dict:
    """Restore the engine and this rank's RNG from `directory`; returns the loop state."""
    import torch

    loop_state = verify(directory)
    engine.load(directory, rank)
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.exists():  # an elastic run may have more workers than the run that saved
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return loop_state


def verify(directory: Path) -> dict:
    """Check every rank's files against its manifest; returns the loop state."""
    state_file = directory / "loop_state.json"
    if not state_file.exists():
        raise CheckpointError(f"{directory}: no loop_state.json; the checkpoint is incomplete")
    loop_state = json.loads(state_file.read_text())
    for rank in range(loop_state["world_size"]):
        manifest_file = directory / f"MANIFEST.rank{rank}.json"
        if not manifest_file.exists():
            raise CheckpointError(f"{directory}: no manifest of rank {rank}; the checkpoint is incomplete")
        for name, size in json.loads(manifest_file.read_text())["files"].items():
            path = directory / name
            if not path.exists() or path.stat().st_size != size:
                raise CheckpointError(
                    f"{directory}: {name} is missing or truncated; the checkpoint is incomplete"
                )
    return loop_state


def save_weights(model, path: Path, trainable_only: bool = False) -> None:
    """A model's state dict (or only its trained parameters) as safetensors."""
    from safetensors.torch import save_file

    state = model.state_dict()
    if trainable_only:
        state = {k: state[k] for k in _trainable_names(model)}
    save_file(_untie({k: v.detach().contiguous().cpu() for k, v in state.items()}), path)


def load_weights(model, path: Path) -> None:
    """Load what `save_weights(trainable_only=True)` wrote: every trained parameter must be there."""
    from safetensors.torch import load_file

    state = load_file(path)
    wanted = _trainable_names(model)
    missing = wanted - set(state)
    unknown = set(state) - set(model.state_dict())
    if missing or unknown:
        raise CheckpointError(
            f"{path}: does not match the model (missing {sorted(missing)[:3]}, unknown {sorted(unknown)[:3]})"
        )
    model.load_state_dict(state, strict=False)


def _trainable_names(model) -> set[str]:
    """State-dict keys of trained parameters (a tied weight under each of its names)."""
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    return {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in trained}


def _untie(state: dict) -> dict:
    """safetensors refuses tensors that share memory (tied embeddings): store a copy of each alias."""
    seen: dict[int, str] = {}
    out = {}
    for key, tensor in state.items():
        ptr = tensor.data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.setdefault(ptr, key)
    return out


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
