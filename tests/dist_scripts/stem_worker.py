"""One rank of a tiny sharded STEM job (launched by torchrun from tests/test_distributed.py), plus the
single-process reference the test compares with. Usage: stem_worker.py CASE OUT_DIR P BACKBONE [CKPT]
(STEM_BUILD=meta: the model is built on the meta device by `build_parallel_model` instead of whole then sharded)."""
import json, os, sys
from pathlib import Path

import torch
import torch.distributed as dist

from stem_nb.model import Transformer, preset, is_table_key
from stem_nb.distributed import (DistributedArgs, init_distributed, parallelize, unwrap, sync_table_grads, stem_norm_hook,
                                 backbone_norm_hook, job_tokens, destroy_distributed, build_parallel_model)
from stem_nb.checkpoint import save_checkpoint, ckpt_name
from stem_nb.restore import load_checkpoint
from stem_nb.optim import OptimArgs, ModelOptimizer

GB, S, STEPS, MAX_NORM = 8, 16, 3, 0.5        # global batch, seq len, steps before save, clip (active: norms are ~1-3)


def model_args(): return preset("debug", ffn_type="stem", stem_layers="all", n_layers=3, vocab_size=256)  # H = 192, tables at 1, 2


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, 256, (GB, S + 1), generator=g)
    return x[:, :-1], x[:, 1:]


OPTIM = OptimArgs(lr=1e-2, weight_decay=0.1, warmup=0, schedule="constant", clip=MAX_NORM)


def optimizer(model):
    "The project's one optimizer: AdamW (backbone) + the row-sparse table optimizer, over this rank's slices."
    return ModelOptimizer(unwrap(model), OPTIM, total_steps=STEPS + 2)


def global_mean(t):
    t = t.detach().clone()
    if dist.is_initialized(): dist.all_reduce(t); t /= dist.get_world_size()
    return t.item()


def train_step(model, layout, opt, step, rank, world):
    x, y = batch(step); n = GB // world
    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    opt.settle(job_tokens(x))           # every row any rank reads this step (as train does)
    loss = model(x, y)
    loss.backward()
    sync_table_grads(model, layout)
    norm = opt.clip_grad_norm_(MAX_NORM, backbone_sq_hook=backbone_norm_hook(model), table_sq_hook=stem_norm_hook(layout))
    opt.step(); opt.zero_grad()
    return global_mean(loss), float(norm)


def setup(P, backbone):
    "The model of this rank: built whole then sharded (`parallelize`), or with STEM_BUILD=meta built on meta (`build_parallel_model`)."
    args = DistributedArgs(backbone=backbone, stem_parallel_size=P)
    rank, world, device = init_distributed(args)
    if os.environ.get("STEM_BUILD") == "meta": model, layout = build_parallel_model(model_args(), args, device)
    else: model, layout = parallelize(Transformer(model_args()), args, device)
    return model, layout, rank, world


def reference(steps=STEPS + 2):
    "Single process, full tables, the whole global batch: (losses, grad norms) per step."
    model, layout, rank, world = setup(1, "none")
    opt = optimizer(model)
    out = [train_step(model, layout, opt, s, 0, 1) for s in range(steps)]
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
            if is_table_key(name) and layout.stem_group is not None: g = gather_cat(g, layout.stem_group, 1)
            grads[name] = g
        if rank == world - 1: torch.save(grads, out / "grads.pt")
    elif case in ("train", "save"):
        opt = optimizer(model)
        res["losses"], res["norms"] = [], []
        for s in range(STEPS):
            l, nrm = train_step(model, layout, opt, s, rank, world)
            res["losses"].append(l); res["norms"].append(nrm)
        # every replica of a slice, every backbone copy: identical, bitwise
        m = unwrap(model)
        for name, e in m.table_parameters():
            if layout.replica_group is not None:
                w = gather_cat(e.detach()[None], layout.replica_group, 0)
                res.setdefault("replica_maxdiff", 0.0)
                res["replica_maxdiff"] = max(res["replica_maxdiff"], (w - w[0]).abs().max().item())
                for k, v in opt.tables.state[e].items():
                    if not torch.is_tensor(v): continue
                    st = gather_cat(v.float()[None], layout.replica_group, 0)
                    res["replica_maxdiff"] = max(res["replica_maxdiff"], (st - st[0]).abs().max().item())
        if backbone == "ddp":
            flat = torch.cat([p.detach().flatten() for _, p in m.backbone_parameters()])
            allw = gather_cat(flat[None], dist.group.WORLD, 0)
            res["backbone_maxdiff"] = (allw - allw[0]).abs().max().item()
        if case == "save":
            save_checkpoint(ckpt, STEPS, model, opt, train_state={"case": "save"}, layout=layout)
            res["next_losses"] = [train_step(model, layout, opt, s, rank, world)[0] for s in (STEPS, STEPS + 1)]
    elif case == "resume":
        opt = optimizer(model)
        st = load_checkpoint(Path(ckpt) / ckpt_name(STEPS), model, opt, layout)
        assert st == {"step": STEPS, "case": "save"}, st
        res["next_losses"] = [train_step(model, layout, opt, s, rank, world)[0] for s in (STEPS, STEPS + 1)]
    if rank == 0: (out / f"{case}.json").write_text(json.dumps(res))
    destroy_distributed()


if __name__ == "__main__":
    main()
