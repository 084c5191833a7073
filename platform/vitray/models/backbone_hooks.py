"""timm's model hooks for a model that wraps a timm ViT as ``self.backbone`` (segmenters, detectors): what the
training stack asks of any model (layer-decay groups, weight-decay exemptions, activation checkpointing)."""
from __future__ import annotations

__all__ = ["BackboneHooks"]


class BackboneHooks:
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def group_matcher(self, coarse: bool = False):
        """The backbone's layer groups under ``backbone.``; the task's own modules fall in the last group."""
        def under(pattern: str) -> str:  # timm's "^a|b|c" -> "^backbone\.(?:a|b|c)" (every alternative anchored)
            return f"^backbone\\.(?:{pattern.removeprefix('^')})"

        inner = self.backbone.group_matcher(coarse)
        return {k: under(v) if isinstance(v, str) else [(under(p), rest) for p, rest in v] for k, v in inner.items()}

    def no_weight_decay(self):
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
