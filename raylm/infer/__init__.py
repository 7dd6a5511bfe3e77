"""Generation: loading what raylm produced (raylm/infer/loading.py) and generating from it with the
controls of raylm.spec.generation (raylm/infer/sampling.py)."""
