"""A Jupyter-first, reproducible research workbook for STEM (Scaling Transformers with Embedding Modules)

Modules:

- `stem_nb.analysis`: The paper's figures 4-7 as functions the figure notebooks call: angular spread of table rows, up-projection outputs vs STEM rows, FF feature similarity, and knowledge editing by swapping rows — with measured success and locality.
- `stem_nb.generate`: Prefill + KV-cache decode with greedy, temperature and top-p sampling and stop strings; the STEM row of every new token is read as it is generated.
- `stem_nb.offload`: STEM tables in host memory: per-step token de-duplication, asynchronous prefetch of each layer's rows, an LFU cache of hot rows on the device with hit/miss/byte counters — numerically identical to the in-memory model."""

__version__ = "0.1.0"
