"""gptqmodel, imported quietly and without touching the job's environment.

raylm's GPTQ quantization and GPTQ models use it. (PEFT's LoRA would import it too, whenever it is
installed, to check each target layer for GPTQ kernels: raylm.methods.unimported spares that.) On import
it prints a banner and notices (the GIL one as a warning) into the job's console, and rewrites the
process's environment: PYTORCH_ALLOC_CONF and CUDA_DEVICE_ORDER (a GPU job's CUDA allocator), and
through its tokenizer helper HF_HOME, HF_HUB_CACHE, TRANSFORMERS_CACHE and HF_MODULES_CACHE (to a folder
under /tmp: the job's own Hugging Face cache would be missed), KMP_DUPLICATE_LIB_OK,
TORCHINDUCTOR_CACHE_DIR. Imported here first, its output goes nowhere and the environment is put back as
the job had it (but for raylm's own GPTQMODEL_* settings; for the seconds of the import, other threads'
prints go nowhere too).

    from raylm.methods.gptqmodel_import import import_gptqmodel
    gptqmodel = import_gptqmodel()
"""

from __future__ import annotations


def import_gptqmodel():
    """The gptqmodel module, with its CPU worker pools sized for this machine (on 2 cores its loader asks
    for 2 workers: GPTQMODEL_CPU_WORKERS grants them)."""
    import contextlib
    import io
    import logging
    import os
    import sys

    if "gptqmodel" in sys.modules:
        return sys.modules["gptqmodel"]
    # torchao, which it imports, registers enums this torch already supports: torch warns
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")
    before = dict(os.environ)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import gptqmodel
    finally:
        for name in set(os.environ) - set(before):
            del os.environ[name]
        os.environ.update(before)
    return gptqmodel
