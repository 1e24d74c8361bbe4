"""Which network a config builds: ``arch`` names a registered network (model/registry.py) or a
``package.module:callable`` of your own (docs/extending.md)."""
from __future__ import annotations

import importlib
from typing import Callable

import torch.nn as nn

from model import ARCHS
from util.config import validate
from util.errors import ConfigError


def resolve_arch(arch: str) -> Callable:
    """The builder ``arch`` names: a registered name, or ``package.module:callable`` importable
    from the repository root; anything else is a ConfigError saying what is accepted."""
    if arch in ARCHS:
        return ARCHS[arch]
    if ":" not in arch:
        raise ConfigError(f"key 'arch' is {arch!r}; expected one of {sorted(ARCHS)} or 'package.module:callable' "
                          f"(docs/extending.md)")
    module_name, _, attr = arch.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"key 'arch' is {arch!r}, but module '{module_name}' cannot be imported ({e}); "
                          f"give a module importable from the repository root") from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ConfigError(f"key 'arch' is {arch!r}, but '{module_name}' has no callable '{attr}'")
    return builder


def build_model(cfg, warn_random_backbone: bool = True) -> nn.Module:
    """The network of ``cfg`` (validated here: derived keys such as ``task`` are resolved).
    A registered builder is told whether to warn about a random backbone; a user's callable
    gets the config alone."""
    cfg = cfg.copy()
    validate(cfg)
    if cfg.arch in ARCHS:
        return ARCHS[cfg.arch](cfg, warn_random_backbone=warn_random_backbone)
    model = resolve_arch(cfg.arch)(cfg)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"arch {cfg.arch!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
