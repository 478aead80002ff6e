"""A Jupyter-first, reproducible research workbook for STEM (Scaling Transformers with Embedding Modules)

Modules:

- `stem_nb.generate`: Prefill + KV-cache decode with greedy, temperature and top-p sampling and stop strings; the STEM row of every new token is read as it is generated."""

__version__ = "0.1.0"
