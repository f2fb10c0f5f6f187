"""Training throughput and peak memory of ALMT on the MOSI config (synthetic MOSI-shaped batches).

One training step = forward + loss + backward + AdamW step, batch 64 by default. The loss is
the released MSE, or with ``--objectives`` that of each training objective (``multitask``,
``contrastive``, ``multitask+contrastive``: the heads they add, their losses and, for
multitask, the generated-label update after each batch, as ``almt train`` runs them).
Cases: text model {MiniLM (embedded), random 768-wide 12-layer BERT} x mode {default, masked}
x device {cpu, cuda when available} x objective. Each case runs in a fresh subprocess so that the peak
memory of one case does not leak into the next (CPU: peak RSS of that process; CUDA:
``torch.cuda.max_memory_allocated``).

Synthetic data: token ids uniform over the vocabulary, features N(0, 1); real lengths drawn
from Beta(2, 5) x max length (mean ~29 % of the maximum, so the longest of 64 is typically
~75 %). Default mode ignores the lengths (padded positions attend, as in the released code);
masked mode masks them and trims each batch to its longest real sequence.

    python benchmarks/train_speed.py                      # all cases, defaults below
    python benchmarks/train_speed.py --steps 10 --warmup 2 --devices cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

TEXT_MODELS = ("minilm", "bert768")
MODES = ("default", "masked")


def _batch(cfg, batch_size: int, vocab: int, device, generator):
    import torch

    def lengths(max_len: int):
        frac = torch.distributions.Beta(2.0, 5.0).sample((batch_size,))
        return (frac * max_len).ceil().clamp(1, max_len).long()

    l_len = lengths(cfg.text_len)  # (B,)
    text = torch.zeros(batch_size, 3, cfg.text_len)  # (B, 3, L) ids / mask / segments
    text[:, 0] = torch.randint(1000, vocab, (batch_size, cfg.text_len), generator=generator).float()
    text[:, 1] = (torch.arange(cfg.text_len)[None, :] < l_len[:, None]).float()
    text[:, 0] *= text[:, 1]  # pad id 0
    audio = torch.randn(batch_size, cfg.audio_len, cfg.audio_dim, generator=generator)  # (B, T_a, d_a)
    vision = torch.randn(batch_size, cfg.vision_len, cfg.vision_dim, generator=generator)  # (B, T_v, d_v)
    a_len, v_len = lengths(cfg.audio_len), lengths(cfg.vision_len)
    labels = torch.empty(batch_size).uniform_(-3, 3, generator=generator)  # (B,)
    return [t.to(device) for t in (text, audio, vision, a_len, v_len, labels)]


def _text_model(name: str):
    from transformers import BertConfig, BertModel

    if name == "minilm":
        from almt_pipeline.model.text_encoder import load_text_model

        return load_text_model("minilm")[0]
    # bert-base shape, random weights (nothing to download)
    return BertModel(BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072))


def _objective(train_cfg, batches: list, model):
    """The training objective over a split made of ``batches`` (None for plain regression)."""
    import numpy as np
    import torch

    from almt_pipeline.batches import Split
    from almt_pipeline.objectives import Objective

    if model.aux is None:
        return None
    labels = torch.cat([b[5] for b in batches]).cpu()
    split = Split(name="train", ids=np.arange(len(labels)).astype(str), inputs=(), labels=labels)
    return Objective(train_cfg, split, "mosi", model.aux.letters)


def run_case(text_model: str, mode: str, device_name: str, steps: int, warmup: int, batch_size: int,
             objective: str = "regression") -> dict:
    """Time ``steps`` training steps after ``warmup`` steps; returns the measurements."""
    import torch

    from almt_pipeline.config import TrainConfig, load_config
    from almt_pipeline.model.almt import ALMT
    from almt_pipeline.model.heads import head_spec
    from almt_pipeline.objectives import parameter_groups

    torch.manual_seed(0)
    device = torch.device(device_name)
    cfg = dataclasses.replace(load_config("mosi").model, masked=(mode == "masked"))
    train_cfg = TrainConfig(objective=objective)
    bert = _text_model(text_model)
    model = ALMT(cfg, bert, bert.config.hidden_size, head_spec(train_cfg)).to(device).train()
    opt = torch.optim.AdamW(parameter_groups(model, train_cfg), lr=1e-4, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    batches = [_batch(cfg, batch_size, bert.config.vocab_size, device, gen) for _ in range(2)]
    aux = _objective(train_cfg, batches, model)

    def step(i: int) -> None:
        text, audio, vision, a_len, v_len, labels = batches[i % len(batches)]
        if aux is None:
            pred = model(text, audio, vision, a_len, v_len)  # (B,)
            loss = torch.nn.functional.mse_loss(pred, labels)
        else:
            outputs: dict = {}
            pred = model(text, audio, vision, a_len, v_len, outputs=outputs)
            rows = torch.arange(batch_size) + (i % len(batches)) * batch_size
            loss = aux.batch_loss(pred, outputs, labels, rows, epoch=2 + i)  # generated labels move
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)  # robust to a step slowed down by other load on the machine
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "text_model": text_model, "mode": mode, "device": device_name, "batch_size": batch_size,
        "objective": objective,
        "steps": steps, "samples_per_s": batch_size / step_s,
        "step_s": step_s, "step_times": times, "peak_mb": peak_mb,
        "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed training steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--text-models", default=",".join(TEXT_MODELS), help="comma list of minilm,bert768")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of default,masked")
    p.add_argument("--devices", default=None, help="comma list of cpu,cuda (default: cpu, and cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--objectives", default="regression",
                   help="comma list of training objectives (regression, multitask, contrastive, multitask+contrastive)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args()

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.case:
        text_model, mode, device, objective = args.case.split(":", 3)
        print(json.dumps(run_case(text_model, mode, device, args.steps, args.warmup, args.batch_size, objective)))
        return

    import torch

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
          + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print(f"# MOSI config, batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps per case "
          f"(median step time), load average {os.getloadavg()[0]:.1f}")
    cases = [(d, t, m, o) for d in devices for t in args.text_models.split(",") for m in args.modes.split(",")
             for o in args.objectives.split(",")]
    for device, text_model, mode, objective in cases:  # one subprocess per case
        cmd = [sys.executable, os.path.abspath(__file__), "--case", f"{text_model}:{mode}:{device}:{objective}",
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        name = f"{device:5s} {text_model:8s} {mode:8s} {objective:21s}"
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{name} FAILED: {tail}", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name} {r['samples_per_s']:8.1f} samples/s  {r['step_s']:7.3f} s/step (median)  "
              f"peak {r['peak_mb']:8.0f} MiB ({r['peak_kind']})", flush=True)


if __name__ == "__main__":
    main()
