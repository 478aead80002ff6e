"""One rank of a model built on the meta device (launched by torchrun from tests/test_scale.py).
Usage: scale_worker.py CASE OUT_DIR
  init:   build_parallel_model (FSDP2 backbone, P = world) equals the single-process build, bitwise; gradients with
          activation checkpointing (selective, full) equal those without, bitwise, on the sharded model.
  memory: peak resident memory (VmHWM) around the build and a few training steps, next to `flops.memory_plan`; the
          baseline is this process's resident memory before the build (libraries loaded and warmed)."""
import gc, json, os, sys, time
from pathlib import Path

import torch
import torch.distributed as dist

from stem_nb.model import Transformer, ModelArgs, preset
from stem_nb.distributed import (DistributedArgs, init_distributed, make_layout, build_parallel_model, apply_activation_checkpointing,
                                 unwrap, sync_table_grads, stem_norm_hook, backbone_norm_hook, job_tokens, destroy_distributed)
from stem_nb.optim import OptimArgs, ModelOptimizer
from stem_nb.files import proc_memory
from stem_nb.bench import reset_peak_rss
from stem_nb.flops import memory_plan

OPTIM = OptimArgs(lr=1e-3, warmup=0, schedule="constant", clip=1.0)


def init_args(): return preset("debug", ffn_type="stem", stem_layers="all", n_layers=3, vocab_size=256)   # H = 192


# the memory case: tables dominate as at the paper's scale (3 tables of [32000, 1024], 131 MB each in fp32)
MEM_ARGS = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=256, ffn_dim_multiplier=3.0,
                max_seq_len=128, ffn_type="stem", stem_layers="all")
MEM_BATCH, MEM_SEQ, MEM_STEPS = 2, 128, 2


def batch(step, V, B, S, rank, world):
    "This rank's share of a global batch of `B * world` sequences."
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, V, (B * world, S + 1), generator=g)[rank * B:(rank + 1) * B]
    return x[:, :-1], x[:, 1:]


def train_step(model, layout, opt, x, y):
    "What `stem_nb.train.train_step` does for one micro-batch."
    opt.settle(job_tokens(x))
    loss = model(x, y)
    loss.backward()
    sync_table_grads(model, layout)
    opt.clip_grad_norm_(OPTIM.clip, backbone_sq_hook=backbone_norm_hook(model), table_sq_hook=stem_norm_hook(layout))
    opt.step(); opt.zero_grad()
    return loss.item()


def local_grads(model):
    "This rank's gradients: FSDP2 shards (local), table slices (dense)."
    out = {}
    for n, p in unwrap(model).named_parameters():
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        out[n] = (g.coalesce().to_dense() if g.is_sparse else g).clone()
    return out


def case_init(out, rank, world):
    dargs = DistributedArgs(backbone="fsdp", stem_parallel_size=world)
    model, layout = build_parallel_model(init_args(), dargs, torch.device("cpu"), chunk=1000)
    single = dict(Transformer(init_args()).named_parameters())       # every rank builds the reference itself
    lo, hi = layout.columns(init_args().hidden_dim)
    res = {"rank": rank, "world": world, "cols": [lo, hi], "mismatch": [], "dtensors": 0, "table_shapes": []}
    for n, p in unwrap(model).named_parameters():
        if hasattr(p, "full_tensor"): res["dtensors"] += 1; got, want = p.full_tensor(), single[n]
        else: got, want = p, single[n][:, lo:hi]
        if n.startswith("stem_tables"): res["table_shapes"].append(list(p.shape))
        if got.shape != want.shape or not torch.equal(got, want): res["mismatch"].append(n)
    # a full state dict (checkpoint.init_from's weights) lands the same way: this rank's shard and columns of each tensor
    state = {k: v * 2 + 1 for k, v in Transformer(init_args()).state_dict().items()}
    placed, _ = build_parallel_model(init_args(), dargs, torch.device("cpu"), state=state, layout=layout)
    for n, p in unwrap(placed).named_parameters():
        got = p.full_tensor() if hasattr(p, "full_tensor") else p
        if not torch.equal(got, state[n] if hasattr(p, "full_tensor") else state[n][:, lo:hi]): res["mismatch"].append(f"state:{n}")
    x, y = batch(0, 256, 2, 16, rank, world)
    grads = {}
    for mode in ("none", "selective", "full"):
        apply_activation_checkpointing(model, mode)
        loss = model(x, y); loss.backward(); sync_table_grads(model, layout)
        grads[mode] = (loss.item(), local_grads(model))
        model.zero_grad(set_to_none=True)
    res["ac_loss"] = {m: l for m, (l, _) in grads.items()}
    res["ac_mismatch"] = [f"{m}:{n}" for m in ("selective", "full") for n, g in grads[m][1].items()
                          if not torch.equal(g, grads["none"][1][n])]
    (out / f"init.rank{rank}.json").write_text(json.dumps(res))


def case_memory(out, rank, world):
    mode = os.environ.get("AC_MODE", "none")
    t0 = time.perf_counter()
    dargs = DistributedArgs(backbone="fsdp", stem_parallel_size=world, activation_checkpointing=mode)
    # warm up what every run loads once: the table optimizer's kernel, FSDP2, gloo's collectives; then the baseline
    tiny, tiny_layout = build_parallel_model(init_args(), dargs, torch.device("cpu"))
    tiny_opt = ModelOptimizer(unwrap(tiny), OPTIM, 10)
    train_step(tiny, tiny_layout, tiny_opt, *batch(0, 256, 2, 16, rank, world))
    del tiny, tiny_opt, tiny_layout
    gc.collect(); dist.barrier()
    baseline = proc_memory()["VmRSS"]
    reset_peak_rss()
    t1 = time.perf_counter()
    margs = ModelArgs(**MEM_ARGS)
    model, layout = build_parallel_model(margs, dargs, torch.device("cpu"))
    V, H, P = margs.vocab_size, margs.hidden_dim, world
    shapes = [list(p.shape) for _, p in unwrap(model).table_parameters()]
    build_hwm = proc_memory()["VmHWM"]
    t2 = time.perf_counter()
    opt = ModelOptimizer(unwrap(model), OPTIM, MEM_STEPS)
    losses = []
    for step in range(MEM_STEPS):
        losses.append(train_step(model, layout, opt, *batch(step, V, MEM_BATCH, MEM_SEQ, rank, world)))
        shapes += [list(p.shape) for _, p in unwrap(model).table_parameters()]
        shapes += [list(v.shape) for _, p in unwrap(model).table_parameters() for v in opt.tables.state[p].values()
                   if torch.is_tensor(v) and v.dim() == 2 and v.shape[0] == V]
    peak = proc_memory()["VmHWM"]
    plan = memory_plan(margs, MEM_BATCH, MEM_SEQ, world=world, stem_parallel_size=P, backbone="fsdp",
                       activation_checkpointing=mode, precision="fp32", device="cpu")
    res = dict(rank=rank, world=world, P=P, V=V, H=H, mode=mode, baseline=baseline, peak=peak, build_hwm=build_hwm,
               plan_peak=plan["peak"], plan_build=plan["build_peak"], plan_phases=plan["phases"], losses=losses,
               table_shapes=sorted({tuple(s) for s in shapes}), full_table_bytes=4 * V * H,
               seconds=dict(warmup=t1 - t0, build=t2 - t1, steps=time.perf_counter() - t2))
    (out / f"memory.rank{rank}.json").write_text(json.dumps(res))


def main():
    case, out = sys.argv[1], Path(sys.argv[2])
    rank, world, _ = init_distributed(DistributedArgs(stem_parallel_size=int(os.environ.get("WORLD_SIZE", 1))))
    {"init": case_init, "memory": case_memory}[case](out, rank, world)
    destroy_distributed()


if __name__ == "__main__":
    main()
