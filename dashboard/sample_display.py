"""What a sample looks like, with no Streamlit: images for display, sequences as letters, token ids as words. The
pages (through `dashboard.components`) and the HTML report draw samples with these."""
from __future__ import annotations

import numpy as np

from analyzers.loading.runs import Run

from . import figures

ALPHABETS = {4: "ACGT", 20: "ACDEFGHIKLMNPQRSTVWY"}


def sequence_letters(x: np.ndarray) -> str:
    """A (C, L) one-hot-like sequence as letters (ACGT for 4 channels, amino acids for 20), else channel numbers."""
    alphabet = ALPHABETS.get(x.shape[0])
    codes = np.asarray(x).argmax(0)
    if alphabet:
        return "".join(alphabet[i] for i in codes)
    return " ".join(str(i) for i in codes)


def token_vocabulary(run: Run) -> list | None:
    """The words of a token model's ids, in id order, when the run's dataset carries them (the text sample's
    `preprocessing["vocabulary"]`); None otherwise."""
    vocabulary = (run.info.get("preprocessing") or {}).get("vocabulary")
    return [str(w) for w in vocabulary] if isinstance(vocabulary, list) and vocabulary else None


def token_texts(run: Run, x: np.ndarray) -> list:
    """A token model's sample as its words (when the run carries a vocabulary) or its token ids, in order; a
    position its attention mask leaves out reads "·"."""
    from analyzers.loading.inputs import InputLayout

    vocabulary = token_vocabulary(run)

    def word(t) -> str:
        return vocabulary[int(t)] if vocabulary and 0 <= int(t) < len(vocabulary) else str(int(t))

    described = (run.info.get("preprocessing") or {}).get("inputs") or run.info["model"].get("inputs")
    if not described:
        return [word(v) for v in np.asarray(x).round().astype(np.int64)]
    layout = InputLayout.from_json(described)
    parts = layout.parts(np.asarray(x)[None])
    ids = parts[layout.inputs[0].name][0]
    mask = parts.get("attention_mask")
    mask = mask[0] if mask is not None and mask.shape[1:] == ids.shape else np.ones_like(ids)
    return [word(t) if keep else "·" for t, keep in zip(ids, mask)]


def display_image(run: Run, x: np.ndarray, *, bands=None) -> np.ndarray:
    """An image input as (H, W) or (H, W, 3) in [0, 1], the run's normalisation undone; `bands` picks one band, or
    three as red, green and blue (default: `figures.default_bands`)."""
    pre = run.info.get("preprocessing") or {}
    return figures.to_display_image(x, mean=pre.get("mean"), std=pre.get("std"), bands=bands)


def enlarged(image: np.ndarray, size: int = 96) -> np.ndarray:
    """An image enlarged without smoothing, so an 8x8 digit stays readable."""
    scale = max(1, size // max(image.shape[:2]))
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def spectrogram_of(run: Run, x: np.ndarray) -> dict | None:
    """An audio dataset's spectrogram description (its preprocessing says so) when `x` is one such input (1, bins,
    frames): drawn on time and frequency axes, else None."""
    if run.info["dataset"]["modality"] != "image" or int(np.asarray(x).shape[0]) != 1:
        return None
    return (run.info.get("preprocessing") or {}).get("spectrogram")


def spectrogram_figure(spectrogram: dict, values, **overlay):
    """A spectrogram input (bins, frames) on its time and frequency axes, a map over it when `overlay` has one."""
    return figures.spectrogram_figure(values, sample_rate=spectrogram["sample_rate"],
                                      hop_length=spectrogram["hop_length"],
                                      frequencies=spectrogram.get("mel_frequencies_hz"), height=300, **overlay)


def attribution_figure(run: Run, x: np.ndarray, display: np.ndarray, *, signed: bool, title: str, truth=None,
                       picture: np.ndarray | None = None, feature_values: np.ndarray | None = None):
    """One sample's attribution map drawn the way its modality reads: over the image (`picture`, default
    `display_image`) or the spectrogram, along the sequence's letters or the tokens' words, or as feature bars
    (`feature_values`, default `display`)."""
    modality = run.info["dataset"]["modality"]
    spectrogram = spectrogram_of(run, x)
    if spectrogram is not None:
        return spectrogram_figure(spectrogram, x[0], attribution=display, signed=signed, title=title)
    if modality == "image":
        return figures.image_attribution_figure(display_image(run, x) if picture is None else picture, display,
                                                signed=signed, title=title, truth=truth)
    if modality == "sequence":
        return figures.sequence_attribution_figure(sequence_letters(x), display, signed=signed, title=title,
                                                   truth=truth)
    if modality == "tokens":
        return figures.sequence_attribution_figure(token_texts(run, x), display, signed=signed, title=title,
                                                   width=24, truth=truth)
    names = run.info["dataset"].get("feature_names") or [f"feature {i}" for i in range(len(x))]
    return figures.feature_attribution_figure(names, display if feature_values is None else feature_values,
                                              title=title)
