"""`kind: evaluate`: models side by side on held-out perplexity and task files (driver.py), one Ray
task per model (measure.py)."""
