"""What a described model's layers are, without torch: shared by a model loaded here and one in a sandboxed worker.

It imports nothing heavy, so that the parent of a sandboxed run (the CLI, the dashboard) can orchestrate a worker
without importing torch first; the worker imports torch while the parent prepares.
"""
from __future__ import annotations


def last_linear_layer(names, kinds: dict) -> str | None:
    """The final classifier layer (its input is the embedding): the last linear layer among `names`."""
    linear = [name for name in names if kinds.get(name) == "linear"]
    return linear[-1] if linear else None


class LayerGroups:
    """Layer groups derived from `layers` and `layer_kinds`: shared by `LoadedModel` and `SandboxedModel`."""

    @property
    def conv_layers(self) -> tuple:
        return tuple(n for n in self.layers if self.layer_kinds.get(n, "").startswith("conv"))

    @property
    def inplace_activations(self) -> tuple:
        return tuple(n for n in self.layers if self.layer_kinds.get(n) == "relu_inplace")

    @property
    def embedding_layer(self) -> str | None:
        return last_linear_layer(self.layers, self.layer_kinds)
