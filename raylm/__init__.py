"""raylm: LLM pretraining, fine-tuning, search, compression and serving from one job spec, on Ray."""
