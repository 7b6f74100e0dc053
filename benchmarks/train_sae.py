"""`sitegen train-sae` throughput: harvest (the model's forward pass to the hook) and training
(the TopK SAE's steps) timed separately, and the training time until the held-out FVU is at most
--target (0.3), on SmolLM2's layer 15 residual stream by default.

    python benchmarks/train_sae.py [--model smollm2] [--hook blocks.15.hook_resid_post] [--tokens 20000]
        [--d-sae 4608] [--k 32] [--batch-size 1024] [--epochs 10] [--target 0.3] [--eval-every 10]

Uses the command's own pieces (compute's packing, the held-out split, harvest, train_topk); the
held-out FVU is evaluated every --eval-every steps outside the timed training (its cost is not
counted). Training stops once the target is reached unless --full. Prints the load average: on
a shared machine the figures move with it.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", default="sotu")
    ap.add_argument("--hook", default="blocks.15.hook_resid_post")
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--target", type=float, default=0.3)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--full", action="store_true", help="train every epoch even after the target is reached")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from sitegen.compute.models import load_model
    from sitegen.compute.packing import pack_sequences
    from sitegen.corpus import load_corpus
    from sitegen.dictionaries.train import TrainOptions, harvest, split_heldout, train_topk

    print(f"load average at start: {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}")
    model = load_model(args.model, device=args.device)
    seqs = list(pack_sequences(load_corpus(args.corpus), model.tokenizer, args.seq_len, args.tokens, args.seed))
    train_ids, held_ids = split_heldout(s.seq_id for s in seqs)
    by_id = {s.seq_id: s for s in seqs}
    first_valid = 1 if model.bos is not None else 0
    t = time.perf_counter()
    train = harvest(model, [by_id[i] for i in train_ids], args.hook, args.seq_len, first_valid, args.device)
    held = harvest(model, [by_id[i] for i in held_ids], args.hook, args.seq_len, first_valid, args.device)
    harvest_s = time.perf_counter() - t
    n = train.shape[0] + held.shape[0]
    print(
        f"harvest {args.hook}: {n} tokens ({train.shape[0]} train, {held.shape[0]} held out) in {harvest_s:.1f} s: "
        f"{n / harvest_s:.0f} tokens/s (positions after BOS; {sum(len(s.token_ids) for s in seqs)} model-input tokens)"
    )

    held_var = float((held.double() - held.double().mean(0)).pow(2).sum())
    state = {"paused": 0.0, "reached": None, "fvu": []}
    t0 = time.perf_counter()

    class Reached(Exception):
        pass

    def on_step(trainer) -> None:
        if trainer.steps_done % args.eval_every and trainer.steps_done != trainer.total_steps:
            return
        pause = time.perf_counter()
        with torch.no_grad():
            x = held * trainer.scale
            _, idx, val = trainer.encode(x)
            recon = trainer._decode(idx, val) + trainer.b_dec
            fvu = float((x - recon).double().pow(2).sum()) / (held_var * trainer.scale**2)
        elapsed = pause - t0 - state["paused"]
        state["fvu"].append((trainer.steps_done, elapsed, fvu))
        print(f"  step {trainer.steps_done:5d}  {elapsed:7.1f} s  held-out FVU {fvu:.3f}", flush=True)
        state["paused"] += time.perf_counter() - pause
        if fvu <= args.target and state["reached"] is None:
            state["reached"] = (trainer.steps_done, elapsed)
            if not args.full:
                raise Reached

    opts = TrainOptions(
        d_sae=args.d_sae, k=args.k, batch_size=args.batch_size, lr=args.lr, epochs=args.epochs, seed=args.seed
    )
    try:
        train_topk(train, opts, on_step=on_step)
    except Reached:
        pass
    steps, elapsed = state["fvu"][-1][:2]
    print(
        f"training {train.shape[1]} -> {args.d_sae}, k {args.k}, batch {args.batch_size}: {steps} steps in {elapsed:.1f} s: "
        f"{steps * min(args.batch_size, train.shape[0]) / elapsed:.0f} tokens/s"
    )
    if state["reached"]:
        s, e = state["reached"]
        print(f"held-out FVU <= {args.target} after {s} steps, {e:.1f} s of training (+ {harvest_s:.1f} s harvest)")
    else:
        print(f"held-out FVU <= {args.target} not reached (last {state['fvu'][-1][2]:.3f})")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
