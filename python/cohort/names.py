"""Pairing a model spec's tensor names with another framework's, every shape checked: by name
when the spec declares the framework's own names (a model of declared tensors), else by order
(Cohort names a spec's layers by place, ``trunk.01.weight``; PyTorch by attribute,
``conv1.weight``)."""

from __future__ import annotations

import re
from typing import Sequence

from . import model_layout

_PLACE = re.compile(r"^(trunk|heads\.[A-Za-z0-9_-]+)\.(\d+)\.(weight|bias)$")


def layer_order(names: Sequence[str]) -> list[str]:
    """Cohort's tensor names in layer order: trunk then heads (in the order given), each layer's
    weight before its bias (the wire order sorts them by name instead)."""
    segments: list[str] = []
    keyed = []
    for name in names:
        match = _PLACE.match(name)
        if match is None:
            raise ValueError(f"tensor {name!r} is not named by place; give the mapping explicitly")
        segment, layer, kind = match.groups()
        if segment not in segments:
            segments.append(segment)
        keyed.append(((segments.index(segment), int(layer), kind != "weight"), name))
    return [name for _, name in sorted(keyed)]


def pair_by_order(spec: str, theirs: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, str]:
    """``{cohort name: their name}`` for the model ``spec`` (TOML) and ``theirs``, the other
    model's ``(name, shape)`` in definition order."""
    tensors, _heads = model_layout(spec)
    shapes = dict(tensors)
    ours = layer_order([name for name, _ in tensors])
    theirs = [(name, tuple(shape)) for name, shape in theirs]
    if len(ours) != len(theirs):
        raise ValueError(
            f"the spec has {len(ours)} tensors ({ours}) and the model {len(theirs)} "
            f"({[n for n, _ in theirs]}); give the mapping explicitly"
        )
    pairs = {}
    for cohort_name, (their_name, shape) in zip(ours, theirs):
        if shapes[cohort_name] != shape:
            raise ValueError(
                f"by order, {cohort_name} {shapes[cohort_name]} pairs with {their_name} {shape}; "
                "define the layers in the spec's order, or give the mapping explicitly"
            )
        pairs[cohort_name] = their_name
    return pairs


def pair_names(spec: str, theirs: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, str]:
    """``{cohort name: their name}``: the same names where the spec has only names ``theirs``
    has, else by order (``pair_by_order``)."""
    tensors, _heads = model_layout(spec)
    shapes = {name: tuple(shape) for name, shape in theirs}
    if not all(name in shapes for name, _ in tensors):
        return pair_by_order(spec, theirs)
    for name, shape in tensors:
        if shapes[name] != shape:
            raise ValueError(f"{name} has shape {shape} in the spec and {shapes[name]} in the model")
    return {name: name for name, _ in tensors}
