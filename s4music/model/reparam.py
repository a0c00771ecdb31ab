"""Untie what SaShiMi ties, without changing what the model computes.

SaShiMi stores one copy of the S4 state matrix Lambda (and of P and B) per layer and lets all H
channels share it (n_ssm = 1), and one step size per channel. `untie` gives each group of channels
its own copy, and optionally each state entry its own step size. The new copies start equal to the
shared one, so at step 0 the expanded model gives exactly the outputs of its source; fine-tuning
then lets them drift apart.

    model, added = untie(load_model("ckpt"), groups=None, untie_pb=True, dt_per_state=True)
"""

from __future__ import annotations

import dataclasses

import torch

from s4music.model.config import S4Config
from s4music.model.sashimi import SaShiMi


def untied_config(s4: S4Config, groups: int, untie_pb: bool, dt_per_state: bool) -> S4Config:
    lambda_copies = max(groups, s4.lambda_copies or s4.n_ssm)
    n_ssm = max(groups, s4.n_ssm) if untie_pb else s4.n_ssm
    return dataclasses.replace(s4, n_ssm=n_ssm, lambda_copies=lambda_copies,
                               dt_per_state=s4.dt_per_state or dt_per_state)


def _tile(old: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Repeat `old` along each axis where `shape` is a multiple of it.

    Channel h uses copy h mod S; with S' a multiple of S, copy g' = g mod S reproduces that."""
    reps = []
    for o, n in zip(old.shape, shape, strict=True):
        if n % o:
            raise ValueError(f"cannot expand a tensor of shape {tuple(old.shape)} to {tuple(shape)}")
        reps.append(n // o)
    return old.repeat(*reps)


def untie(model: SaShiMi, groups: int | None = None, untie_pb: bool = False,
          dt_per_state: bool = False) -> tuple[SaShiMi, int]:
    """A copy of `model` with Lambda (and P, B with `untie_pb`) held per group of channels.

    groups: copies per layer; None gives every channel its own. Layers narrower than `groups`
    get one copy per channel. Returns the expanded model and how many parameters it added.
    """
    cfg = model.config
    widths = [cfg.d_model * cfg.expand ** i for i in range(len(cfg.pool) + 1)]
    copies = max(widths) if groups is None else groups
    bad = [w for w in widths if copies < 1 or w % min(copies, w)]
    if bad:
        raise ValueError(f"groups={groups} must divide every layer width {widths}")
    config = dataclasses.replace(cfg, s4=untied_config(cfg.s4, copies, untie_pb, dt_per_state))
    expanded = SaShiMi(config)
    old = model.state_dict()
    new = {k: _tile(old[k], v.shape) if v.shape != old[k].shape else old[k]
           for k, v in expanded.state_dict().items()}
    expanded.load_state_dict(new)
    expanded.audio = dataclasses.replace(model.audio)
    expanded.summary = dict(model.summary)
    expanded.train(model.training)
    return expanded, expanded.num_parameters() - model.num_parameters()
