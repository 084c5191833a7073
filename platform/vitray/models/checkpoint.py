"""Initialise a model from a weights file, whatever its layout, and say exactly what did not fit."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

__all__ = ["CheckpointError", "read_state_dict", "load_weights", "classifier_keys", "EXPORT_WEIGHTS"]

log = logging.getLogger("vitray.models")
EXPORT_WEIGHTS = "model.safetensors"  # the weights file inside a vitray export directory
_CONTAINER_KEYS = ("state_dict", "model", "module", "model_state", "model_ema", "state_dict_ema")


class CheckpointError(ValueError):
    """A weights file that cannot initialise the model (missing, unreadable, or keys/shapes that do not fit)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``: a file
    from elsewhere never runs code), or a vitray export directory. Common containers (``{"model": ...}``,
    ``{"state_dict": ...}``) and DDP's ``module.`` prefix are unwrapped."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / EXPORT_WEIGHTS
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise CheckpointError(f"cannot read checkpoint {p}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
    while isinstance(sd, dict):
        inner = next((sd[k] for k in _CONTAINER_KEYS if isinstance(sd.get(k), dict)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"checkpoint {p} holds no state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"checkpoint {p} holds no tensors")
    return sd


def classifier_keys(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier(s): ``head``, plus ``head_dist`` for DeiT-distilled models."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier", "head")
    return (names,) if isinstance(names, str) else tuple(names)


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state_dict`` into a timm ViT.

    timm's own checkpoint filter for the architecture converts foreign layouts and resamples position
    embeddings (and patch embeddings) to the model's grid. A classifier with another number of classes is
    re-initialised with a one-line warning. Any other missing or unexpected key, or shape mismatch, is a
    :class:`CheckpointError` that lists them.
    """
    filter_fn = _filter_fn(model)
    if filter_fn is not None:
        state_dict = filter_fn(dict(state_dict), model)
    own = model.state_dict()
    state_dict = _pooling_norm(state_dict, own, source)
    reinit = []
    for head in classifier_keys(model):
        keys = [k for k in state_dict if k.startswith(head + ".")]
        if not keys:
            if any(k.startswith(head + ".") for k in own):  # a backbone (an MAE encoder): a new classifier
                reinit.append(head)
                log.info("%s: no %s in the checkpoint (a backbone): the classifier starts fresh", source, head)
            continue
        if not any(k.startswith(head + ".") for k in own):  # backbone without classifier: drop it quietly
            for k in keys:
                state_dict.pop(k)
            log.info("%s: classifier %s dropped (model has no classifier)", source, head)
            continue
        if any(k not in own or own[k].shape != state_dict[k].shape for k in keys):
            given = state_dict[f"{head}.weight"].shape[0] if f"{head}.weight" in state_dict else "?"
            for k in keys:
                state_dict.pop(k)
            reinit.append(head)
            want = own[f"{head}.weight"].shape[0] if f"{head}.weight" in own else "?"
            log.warning("vitray: %s has a %s-class %s, the model %s classes: %s re-initialised",
                        source, given, head, want, head)
    mismatched = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state_dict.items()
                  if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(f"{source}: shape mismatch for {len(mismatched)} key(s): " + ", ".join(mismatched[:20]))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not any(k.startswith(h + ".") for h in reinit)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))


def _pooling_norm(state: dict, own: dict, source: str) -> dict:
    """timm ViTs keep their final LayerNorm as ``norm`` (class-token pooling: before pooling) or ``fc_norm`` (average
    pooling: after it). A checkpoint of the other pooling initialises the model's final norm from its own (as MAE
    fine-tuning from a class-token encoder to average pooling does), with a line in the log."""
    for have, want in (("norm", "fc_norm"), ("fc_norm", "norm")):
        if f"{have}.weight" in state and f"{want}.weight" not in state and f"{want}.weight" in own \
                and f"{have}.weight" not in own:
            state = {(want + k[len(have):] if k.startswith(have + ".") else k): v for k, v in state.items()}
            log.info("%s: its %s initialises the model's %s (another global pooling)", source, have, want)
    return state


def _filter_fn(model: nn.Module):
    """timm's checkpoint filter for this model's family (conversion of foreign layouts, pos-embed resampling)."""
    import sys

    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)
