"""eval_mode(model): calibration and quantization run a model in eval mode, then give each module its own
training flag back (model.train(flag) would give every submodule the top module's: a wrapper left in
training mode around a model in eval mode would come back with dropout on)."""
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
        training = {"": flags.get(id(model), model.training)}
        for name, m in model.named_modules(remove_duplicate=False):
            # a module made meanwhile (a QuantLinear) takes its parent's flag
            m.training = flags.get(id(m), training[name.rpartition(".")[0]] if name else training[""])
            training[name] = m.training
