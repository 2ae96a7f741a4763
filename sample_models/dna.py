"""`dna`: a 1-D CNN over one-hot DNA on generated sequences whose class is set by a planted motif (no download).

Ground truth shipped in the metadata:
- `motif_start`, `motif_end` (end exclusive): where the class motif was planted, for checking attributions;
- `label_flipped`, `true_label`: a known fraction of labels (train and test) was replaced by another class, for
  checking label-noise detection. `label` (y) is the possibly flipped label, `true_label` the class of the motif.
Each sequence may also hold a decoy: the first bases of another class's motif, so a model cannot use a fragment.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
from torch import nn

from . import SampleData

SUMMARY = "DNA sequences classed by a planted motif, with a known share of labels flipped: find the label noise."
CLASS_NAMES = ("motif_a", "motif_b", "motif_c")
ALPHABET = "ACGT"  # one-hot channel order
SEQUENCE_LENGTH = 100
INPUT_SHAPE = (len(ALPHABET), SEQUENCE_LENGTH)
MOTIFS = ("CACGTGAC", "TTAGGCAT", "GATCCGTA")  # one per class, in CLASS_NAMES order
DECOY_LENGTH = 5
DECOY_RATE = 0.5
FLIP_RATE = 0.08
SPLIT_SIZES = {"train": 2000, "test": 600}
SPLIT_SEEDS = {"train": 11, "test": 12}


def build_model() -> nn.Module:
    # Global max pooling keeps position out of the classifier, and the pointwise conv2 mixes motif detectors without
    # widening their reach: Grad-CAM on conv2 peaks inside the planted motif (98% of test samples when trained).
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv1d(len(ALPHABET), 32, 9, padding=4), relu1=nn.ReLU(),
        conv2=nn.Conv1d(32, 32, 1), relu2=nn.ReLU(),
        pool=nn.AdaptiveMaxPool1d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(32, len(CLASS_NAMES)),
    ))


def one_hot(sequences: np.ndarray) -> np.ndarray:
    """(N, L) integer codes 0..3 -> (N, 4, L) float32 one-hot."""
    return np.eye(len(ALPHABET), dtype=np.float32)[sequences].transpose(0, 2, 1).copy()


def decode(x: np.ndarray) -> str:
    """One (4, L) one-hot sample back to its letters."""
    return "".join(ALPHABET[i] for i in np.asarray(x).argmax(0))


def _codes(text: str) -> np.ndarray:
    return np.array([ALPHABET.index(ch) for ch in text], dtype=np.int64)


def _holds_other_motif(seq: np.ndarray, label: int) -> bool:
    text = "".join(ALPHABET[i] for i in seq)
    return any(motif in text for k, motif in enumerate(MOTIFS) if k != label)


def _generate(n: int, seed: int):
    rng = np.random.default_rng(seed)
    motif_codes = [_codes(m) for m in MOTIFS]
    width = len(MOTIFS[0])
    true_label = rng.integers(0, len(CLASS_NAMES), n)
    sequences = np.empty((n, SEQUENCE_LENGTH), dtype=np.int64)
    starts = np.empty(n, dtype=np.int64)
    decoy_starts = np.full(n, -1, dtype=np.int64)
    for i in range(n):
        label = int(true_label[i])
        while True:  # redraw the rare sequence where a random background spells another class's whole motif
            seq = rng.integers(0, len(ALPHABET), SEQUENCE_LENGTH)
            start = int(rng.integers(0, SEQUENCE_LENGTH - width + 1))
            seq[start:start + width] = motif_codes[label]
            decoy = -1
            if rng.random() < DECOY_RATE:
                other = int((label + rng.integers(1, len(CLASS_NAMES))) % len(CLASS_NAMES))
                free = [p for p in range(SEQUENCE_LENGTH - DECOY_LENGTH + 1)
                        if p + DECOY_LENGTH <= start or p >= start + width]
                decoy = int(rng.choice(free))
                seq[decoy:decoy + DECOY_LENGTH] = motif_codes[other][:DECOY_LENGTH]
            if not _holds_other_motif(seq, label):
                break
        sequences[i], starts[i], decoy_starts[i] = seq, start, decoy
    # Flip an exact, known fraction of labels to another class.
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=int(round(FLIP_RATE * n)), replace=False)] = True
    label = true_label.copy()
    label[flipped] = (true_label[flipped] + rng.integers(1, len(CLASS_NAMES), int(flipped.sum()))) % len(CLASS_NAMES)
    return sequences, label, true_label, starts, decoy_starts, flipped


def load_data(split: str) -> SampleData:
    sequences, label, true_label, starts, decoy_starts, flipped = _generate(SPLIT_SIZES[split], SPLIT_SEEDS[split])
    offset = 0 if split == "train" else SPLIT_SIZES["train"]  # ids unique across both splits
    gc = np.isin(sequences, [ALPHABET.index("C"), ALPHABET.index("G")]).mean(1)
    return SampleData(
        x=one_hot(sequences), y=label.astype(np.int64), ids=np.arange(len(label)) + offset,
        metadata={"motif_start": starts, "motif_end": starts + len(MOTIFS[0]), "decoy_start": decoy_starts,
                  "label_flipped": flipped, "true_label": true_label.astype(np.int64),
                  "gc_content": gc.astype(np.float32)},
        ground_truth=("motif_start", "motif_end", "decoy_start", "label_flipped", "true_label"))


def train(out_dir) -> dict:
    from .training import fit

    return fit("dna", build_model, load_data("train"), load_data("test"), out_dir=out_dir, epochs=15, lr=3e-3)
