"""What a model takes as input, and how token ids or several inputs ride in one float32 row per sample.

Every analysis here feeds a model one float32 batch (N, *sample_shape). A `.pt2` program whose input is token ids,
or that takes several inputs (ids and an attention mask), is described by an `InputLayout`: each sample's inputs,
flattened, side by side in one float32 row. `accept_packed_inputs` makes the program take such rows: it splits each
row and casts every part back to the dtype the program records, so the program sees exactly the int64 ids it was
exported with. float32 holds every integer up to 2**24 exactly; larger ids are refused when the data is loaded.

Explanations of a token model are one score per token (the ids' shape), computed through its embedding layer. A
token is removed (deletion curves, occlusion, the Integrated Gradients baseline) by replacing its id with `PAD_ID`,
keeping the other inputs (the attention mask) as they are.

It imports numpy only: the parent of a sandboxed worker describes a model without importing torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import AnalyzerError

MAX_EXACT_INTEGER = 2 ** 24  # float32 represents every integer up to this exactly
PAD_ID = 0  # the id a removed token takes: [PAD] in BERT's and most WordPiece vocabularies
_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
TOKEN_IDS_HINT = ("save the token ids as an int array named after the model's first input (or x), one row per "
                  "sample, and each other input under its own name")


@dataclass(frozen=True)
class ModelInput:
    """One input of a program: its name in the export, one sample's shape, and its dtype ("int64", ...)."""

    name: str
    shape: tuple
    dtype: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def is_integer(self) -> bool:
        return self.dtype.startswith(("int", "uint")) or self.dtype == "bool"


@dataclass(frozen=True)
class InputLayout:
    """The inputs of a model in the order the program takes them; the first of a packed layout is the token ids."""

    inputs: tuple  # of ModelInput
    keywords: tuple = ()  # names the program takes by keyword (the rest are positional, in order)

    @classmethod
    def single(cls, shape: tuple) -> "InputLayout":
        return cls((ModelInput("x", tuple(shape), "float32"),))

    @classmethod
    def from_json(cls, value) -> "InputLayout":
        """From what `to_json` wrote (a run's `run.json`, a worker's description), every field checked."""
        try:
            inputs = tuple(ModelInput(str(v["name"]), tuple(int(d) for d in v["shape"]), str(v["dtype"]))
                           for v in value["inputs"])
            keywords = tuple(str(k) for k in value.get("keywords", ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise AnalyzerError(f"the model's inputs are described in an unexpected form ({exc})") from exc
        if not inputs or any(i.dtype not in _DTYPES or any(d < 1 for d in i.shape) for i in inputs):
            raise AnalyzerError("the model's inputs are described with an unknown dtype or an empty shape")
        return cls(inputs, keywords).checked()

    def to_json(self) -> dict:
        return {"inputs": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype} for i in self.inputs],
                "keywords": list(self.keywords)}

    def checked(self) -> "InputLayout":
        """Refuse layouts the analyses cannot take: several inputs are read as token ids plus what goes with them."""
        first = self.inputs[0]
        if self.packed and not (first.is_integer and len(first.shape) == 1):
            raise AnalyzerError(f"the model takes {len(self.inputs)} inputs and the first, {first.name!r}, is "
                                f"{first.dtype} of shape {first.shape}: several inputs are analysed when the first "
                                f"is token ids (N, L), such as input_ids and attention_mask; wrap the model so "
                                f"forward takes one float tensor otherwise")
        return self

    @property
    def packed(self) -> bool:
        """Whether samples are packed rows (token ids, or several inputs) rather than the one input itself."""
        return len(self.inputs) > 1 or self.inputs[0].is_integer

    @property
    def sample_shape(self) -> tuple:
        return (sum(i.size for i in self.inputs),) if self.packed else tuple(self.inputs[0].shape)

    @property
    def modality(self) -> str | None:
        """"tokens" for a packed layout; None when the one float input says its own modality by its shape."""
        return "tokens" if self.packed else None

    @property
    def token_length(self) -> int:
        return self.inputs[0].size

    def _bounds(self):
        start = 0
        for spec in self.inputs:
            yield spec, start, start + spec.size
            start += spec.size

    # --- rows of samples -----------------------------------------------------------------------------------------

    def pack(self, arrays: dict, where: str) -> np.ndarray:
        """(N, total) float32 rows from one array per input name, each (N, *shape) of integers or numbers."""
        parts, n = [], None
        for spec in self.inputs:
            if spec.name not in arrays:
                raise AnalyzerError(f"{where} has no array {spec.name!r}, which the model takes as an input "
                                    f"({spec.dtype}, shape (N, {', '.join(map(str, spec.shape))})): "
                                    f"{TOKEN_IDS_HINT}")
            value = np.asarray(arrays[spec.name])
            if value.ndim < 1 or tuple(value.shape[1:]) != spec.shape or (n is not None and len(value) != n):
                raise AnalyzerError(f"{spec.name!r} in {where} has shape {value.shape}, but the model takes "
                                    f"(N, {', '.join(map(str, spec.shape))}) with N the number of samples")
            n = len(value)
            if spec.is_integer:
                if value.dtype.kind == "f" and not np.all(np.isfinite(value) & (value == np.round(value))):
                    raise AnalyzerError(f"{spec.name!r} in {where} holds values that are not integers, but the "
                                        f"model takes {spec.dtype}: save the token ids as integers")
                if value.dtype.kind not in "biuf":
                    raise AnalyzerError(f"{spec.name!r} in {where} holds {value.dtype}, not integers")
                if value.size and (value.min() < 0 or value.max() > MAX_EXACT_INTEGER):
                    raise AnalyzerError(f"{spec.name!r} in {where} holds values outside 0..{MAX_EXACT_INTEGER:,}: "
                                        f"token ids must be non-negative and below 2**24")
            elif value.dtype.kind not in "biuf":
                raise AnalyzerError(f"{spec.name!r} in {where} holds {value.dtype}, not numbers")
            parts.append(value.reshape(len(value), -1).astype(np.float32))
        return np.ascontiguousarray(np.concatenate(parts, axis=1))

    def token_ids(self, x) -> np.ndarray:
        """(N, L) int64 token ids of packed rows."""
        return np.asarray(x)[:, :self.token_length].round().astype(np.int64)

    def parts(self, x) -> dict:
        """Each input of packed rows by name, in its own dtype and shape (what the program is given)."""
        x = np.asarray(x)
        return {spec.name: x[:, a:b].reshape(len(x), *spec.shape).round().astype(spec.dtype) if spec.is_integer
                else x[:, a:b].reshape(len(x), *spec.shape) for spec, a, b in self._bounds()}

    def token_baseline(self, x: np.ndarray) -> np.ndarray:
        """Packed rows with every token replaced by `PAD_ID` and the other inputs kept."""
        base = np.array(x, dtype=np.float32, copy=True)
        base[:, :self.token_length] = PAD_ID
        return base

    def token_positions(self, removed: np.ndarray) -> np.ndarray:
        """A (..., L) per-token mask as a (..., total) mask over packed rows (False on the other inputs)."""
        pad = np.zeros((*removed.shape[:-1], self.sample_shape[0] - self.token_length), dtype=bool)
        return np.concatenate([removed, pad], axis=-1)


def parse_inputs(text: str) -> InputLayout:
    """`NAME:DTYPE:SHAPE,...` (shape dimensions joined by x), e.g. `input_ids:int64:12,attention_mask:int64:12`:
    the inputs of a state dict's import-path architecture, which no file records."""
    inputs = []
    for item in str(text).split(","):
        parts = item.strip().split(":")
        try:
            name, dtype, shape = parts
            dims = tuple(int(d) for d in shape.split("x"))
        except ValueError:
            raise AnalyzerError(f"--inputs item {item.strip()[:40]!r} is not NAME:DTYPE:SHAPE, such as "
                                f"input_ids:int64:12 or pixels:float32:3x32x32") from None
        if not name.isidentifier() or dtype not in _DTYPES or any(d < 1 for d in dims):
            raise AnalyzerError(f"--inputs item {item.strip()[:40]!r} needs a Python name, one of the dtypes "
                                f"{', '.join(_DTYPES)}, and positive dimensions")
        inputs.append(ModelInput(name, dims, dtype))
    if len({i.name for i in inputs}) != len(inputs):
        raise AnalyzerError("--inputs names an input twice: name each once, in the order forward takes them")
    return InputLayout(tuple(inputs)).checked()


def layout_of(model) -> InputLayout:
    """The input layout of a LoadedModel, a SandboxedModel or a plain module (then its one float input)."""
    layout = getattr(model, "input_layout", None)
    if isinstance(layout, InputLayout):
        return layout
    return InputLayout.single(tuple(getattr(model, "input_shape", ()) or ()))


def accept_packed_inputs(module, layout: InputLayout):
    """Make an unflattened program take packed rows: a forward pre-hook splits each row into the program's inputs
    and casts them to their dtypes. A hook rather than a wrapper module, so that layer names stay the program's
    own (the names a person exported and reads in every table). Returns the hook's handle."""
    import torch

    dtypes = {spec.name: getattr(torch, spec.dtype) for spec in layout.inputs}
    bounds = list(layout._bounds())

    def unpack(_module, args, kwargs):
        if kwargs or len(args) != 1:
            return None  # already the program's own inputs (the program itself being called directly)
        x = args[0]
        parts = {}
        for spec, a, b in bounds:
            part = x[:, a:b].reshape(x.shape[0], *spec.shape)
            if spec.is_integer and part.is_floating_point():
                part = part.round()
            parts[spec.name] = part.to(dtypes[spec.name])
        positional = tuple(parts[s.name] for s in layout.inputs if s.name not in layout.keywords)
        return positional, {k: parts[k] for k in layout.keywords}

    return module.register_forward_pre_hook(unpack, with_kwargs=True)
