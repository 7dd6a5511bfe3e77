"""What runs leave behind, read for people: `raylm report PATH` writes one self-contained HTML page (its
plots inline) for any run, search, compression, evaluation or pipeline (page.py, sections.py, plots.py);
`raylm runs [DIR]` lists the run folders under DIR (runs.py); a pipeline's lineage.json and `raylm
lineage` (lineage.py)."""
