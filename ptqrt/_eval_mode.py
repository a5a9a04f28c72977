"""eval_mode(model): calibration and quantization run a model in eval mode, then give each module its own
training flag back (model.train(flag) alone would give every submodule the top module's: a wrapper left
in training mode around a model in eval mode would come back with dropout on)."""
from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    flags = {id(m): m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        # Through train(), so that overrides see the change (transformers' models re-select their kernels,
        # some modules clear caches): the top module's flag, then, parents first, each module whose own
        # flag differs from what its parent's call gave it. A module made meanwhile (a QuantLinear) keeps
        # its parent's.
        model.train(flags.get(id(model), model.training))
        for m in model.modules():
            want = flags.get(id(m))
            if want is not None and m.training != want:
                m.train(want)
