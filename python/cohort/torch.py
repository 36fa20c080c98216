"""The PyTorch bridge: a module's parameters to the federation's named tensors and back.

Cohort names a spec's tensors by place (``trunk.01.weight``, ``heads.digit.00.bias``); PyTorch
by attribute (``conv1.weight``). A mapping pairs them: given explicitly, or found by order
(each layer's weight then bias, trunk then heads in spec order, against the module's parameters
in registration order, ``name_map``), every pair checked for shape. Then::

    params = cohort.torch.to_params(model, mapping)          # module -> federation
    cohort.torch.load_params(model, params, mapping)         # federation -> module
    cohort.torch.load(model, "model.safetensors")            # an exported model, in one line
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from . import load_model, model_spec
from .names import pair_names

__all__ = ["load", "load_params", "name_map", "to_params"]


def name_map(module: torch.nn.Module, spec: str) -> dict[str, str]:
    """``{cohort name: module parameter name}`` for the model ``spec`` (TOML): by name for a spec
    that declares the module's own names, else by order."""
    return pair_names(spec, [(name, tuple(p.shape)) for name, p in module.named_parameters()])


def to_params(module: torch.nn.Module, mapping: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The module's parameters under Cohort's names (float32 NumPy arrays)."""
    state = module.state_dict()
    return {ours: state[theirs].detach().cpu().numpy().astype(np.float32, copy=True) for ours, theirs in mapping.items()}


def load_params(module: torch.nn.Module, params: Mapping[str, np.ndarray], mapping: Mapping[str, str]) -> None:
    """Copies ``params`` (Cohort's names) into the module, in place, on the module's device."""
    with torch.no_grad():
        state = dict(module.named_parameters())
        for ours, theirs in mapping.items():
            target = state[theirs]
            value = torch.from_numpy(np.ascontiguousarray(params[ours], dtype=np.float32))
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{ours} has shape {tuple(value.shape)}; the module's {theirs} {tuple(target.shape)}")
            target.copy_(value.to(device=target.device, dtype=target.dtype))


def load(module: torch.nn.Module, path, mapping: Mapping[str, str] | None = None) -> torch.nn.Module:
    """Loads a model file (``cohort-server export``) into ``module``, by the file's spec and
    ``mapping`` (default: by order); returns the module."""
    if mapping is None:
        spec = model_spec(path)
        if spec is None:
            raise ValueError(f"{path} carries no model spec; give the mapping explicitly")
        mapping = name_map(module, spec)
    load_params(module, load_model(path), mapping)
    return module
