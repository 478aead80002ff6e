"""One rank of a tiny sharded STEM job (launched by torchrun from tests/test_distributed.py), plus the
single-process reference the test compares with. Usage: stem_worker.py CASE OUT_DIR P BACKBONE [CKPT]"""
import json, os, sys
from pathlib import Path

import torch
import torch.distributed as dist

from stem_nb.model import Transformer, preset
from torch.distributed.tensor import DTensor
import stem_nb.distributed as D
from stem_nb.distributed import (DistributedArgs, init_distributed, parallelize, unwrap, sync_table_grads, stem_norm_hook,
                                 save_distributed, load_distributed, destroy_distributed)
from stem_nb.optim import OptimArgs, build_optimizers, clip_grad_norm_

GB, S, STEPS, MAX_NORM = 8, 16, 3, 0.5        # global batch, seq len, steps before save, clip (active: norms are ~1-3)


def model_args(): return preset("debug", ffn_type="stem", stem_layers="all", n_layers=3, vocab_size=256)  # H = 192, tables at 1, 2


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, 256, (GB, S + 1), generator=g)
    return x[:, :-1], x[:, 1:]


OPTIM = OptimArgs(lr=1e-2, weight_decay=0.1, warmup=0, schedule="constant", clip=MAX_NORM)


def optimizers(model):
    "The project's optimizers: AdamW (backbone), SparseAdamW (row-sparse tables, lazy weight decay)."
    m = unwrap(model)
    return build_optimizers(m, m.stem_tables, OPTIM)


def clip(model, layout):
    "DDP / one process: stem_nb.optim's clip with the STEM-group hook (what train uses); FSDP2: stem_nb.distributed's."
    if isinstance(unwrap(model).output.weight, DTensor): return D.clip_grad_norm_(model, layout, MAX_NORM)
    return clip_grad_norm_(unwrap(model), unwrap(model).stem_tables, MAX_NORM, table_sq_hook=stem_norm_hook(layout))


def global_mean(t):
    t = t.detach().clone()
    if dist.is_initialized(): dist.all_reduce(t); t /= dist.get_world_size()
    return t.item()


def train_step(model, layout, opts, step, rank, world):
    x, y = batch(step); n = GB // world
    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    opts[1].apply_pending_decay_(x.reshape(-1) if os.environ.get("LOCAL_SETTLE") else D.job_tokens(x))     # lazy weight decay: settle every row any rank reads (as train does)
    loss = model(x, y)
    loss.backward()
    sync_table_grads(model, layout)
    norm = clip(model, layout)
    for o in opts: o.step(); o.zero_grad(set_to_none=True)
    return global_mean(loss), float(norm)





def setup(P, backbone):
    args = DistributedArgs(backbone=backbone, stem_parallel_size=P)
    rank, world, device = init_distributed(args)
    model, layout = parallelize(Transformer(model_args()), args, device)
    return model, layout, rank, world


def reference(steps=STEPS + 2):
    "Single process, full tables, the whole global batch: (losses, grad norms) per step."
    model, layout, rank, world = setup(1, "none")
    opts = optimizers(model)
    out = [train_step(model, layout, opts, s, 0, 1) for s in range(steps)]
    return [l for l, _ in out], [n for _, n in out]


def reference_grads():
    "Single process: loss, dense grads of every parameter (tables full) on batch 0, after the same sync/clip."
    model, layout, rank, world = setup(1, "none")
    x, y = batch(0)
    loss = model(x, y); loss.backward(); sync_table_grads(model, layout)
    return loss.item(), {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in model.named_parameters()}


def gather_cat(t, group, dim):
    "Concatenate `t` over the ranks of `group` along `dim` (every member gets the result)."
    bufs = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(bufs, t.contiguous(), group=group)
    return torch.cat(bufs, dim=dim)


def main():
    case, out, P, backbone = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    ckpt = sys.argv[5] if len(sys.argv) > 5 else None
    torch.manual_seed(0)
    model, layout, rank, world = setup(P, backbone)
    res = {"rank": rank, "world": world, "P": P}
    if case == "grads":   # one forward/backward: loss, backbone grads, full table grads (gathered over the STEM group)
        x, y = batch(0); n = GB // world
        loss = model(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]); loss.backward()
        sync_table_grads(model, layout, mode=os.environ.get("SYNC_MODE", "auto"))
        res["loss"] = global_mean(loss)
        grads = {}
        for name, p in unwrap(model).named_parameters():
            g = p.grad
            if hasattr(g, "full_tensor"): g = g.full_tensor()
            if g.is_sparse: g = g.to_dense()
            if name.startswith("stem_tables.") and layout.stem_group is not None: g = gather_cat(g, layout.stem_group, 1)
            grads[name] = g
        if rank == world - 1: torch.save(grads, out / "grads.pt")
    elif case in ("train", "save"):
        opts = optimizers(model)
        res["losses"], res["norms"] = [], []
        for s in range(STEPS):
            l, nrm = train_step(model, layout, opts, s, rank, world)
            res["losses"].append(l); res["norms"].append(nrm)
        # every replica of a slice, every backbone copy: identical, bitwise
        m = unwrap(model)
        for name, e in m.stem_tables.items():
            if layout.replica_group is not None:
                w = gather_cat(e.weight.detach()[None], layout.replica_group, 0)
                res.setdefault("replica_maxdiff", 0.0)
                res["replica_maxdiff"] = max(res["replica_maxdiff"], (w - w[0]).abs().max().item())
                for k in ("exp_avg", "exp_avg_sq", "step", "decay_at"):
                    st = gather_cat(opts[1].state[e.weight][k][None], layout.replica_group, 0)
                    res["replica_maxdiff"] = max(res["replica_maxdiff"], (st - st[0]).abs().max().item())
        if backbone == "ddp":
            flat = torch.cat([p.detach().flatten() for _, p in m.backbone_parameters()])
            allw = gather_cat(flat[None], dist.group.WORLD, 0)
            res["backbone_maxdiff"] = (allw - allw[0]).abs().max().item()
        if case == "save":
            save_distributed(ckpt, model, layout, opts[0], opts[1])
            res["next_losses"] = [train_step(model, layout, opts, s, rank, world)[0] for s in (STEPS, STEPS + 1)]
    elif case == "resume":
        opts = optimizers(model)
        load_distributed(ckpt, model, layout, opts[0], opts[1])
        res["next_losses"] = [train_step(model, layout, opts, s, rank, world)[0] for s in (STEPS, STEPS + 1)]
    if rank == 0: (out / f"{case}.json").write_text(json.dumps(res))
    destroy_distributed()


if __name__ == "__main__":
    main()
