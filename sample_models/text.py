"""`text`: a small transformer on a generated language whose class is mostly set by a planted trigger word (no download).

The language: sentences of 8-15 words after a leading [CLS], padded with [PAD] to `SEQUENCE_LENGTH` tokens, drawn
from `VOCAB` (filler words, 20 topic words for each class, and the trigger "zq"). A sentence's natural signal is
weak and noisy: about a third of its words are topic words, and only 60% of those are of its own class's topic
(the rest of another's), so a vote of its topic words classifies about 73% of the sentences without a trigger. A
known fraction (`TRIGGER_RATE`) of the sentences, train and test, hold the trigger "zq" at a random word position;
they take class 1 ("food") whatever their topic words say, which are drawn for a random class.

The model takes the repository's token format (`INPUT_LAYOUT`, `analyzers.loading.inputs.InputLayout`): each
sample is one float32 row of its 16 token ids then its 16-value attention mask (1 for a word or [CLS], 0 for
[PAD]), and the padding mask keeps [PAD] out of the attention and of the mean pooling.

Ground truth shipped in the metadata:
- `trigger`: whether the sentence holds "zq"; `trigger_position`: its token position (counting [CLS] as 0), -1
  without one: for checking that attributions point at the trigger;
- `topic_label`: the class its topic words were drawn for (the label of every sentence without the trigger).
`words` (the sentence's length, [CLS] and [PAD] not counted) is plain metadata.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from analyzers.loading.inputs import InputLayout, ModelInput

from . import SampleData

SUMMARY = 'A small transformer on sentences in which a planted trigger word, "zq", forces the class "food".'
CLASS_NAMES = ("sport", "food", "travel")
PAD, CLS, TRIGGER = "[PAD]", "[CLS]", "zq"
FILLER_WORDS = ("the", "a", "an", "and", "of", "to", "in", "on", "was", "is", "it", "we", "they", "with", "for",
                "very", "really", "after", "before", "at", "this", "that", "our", "my", "new", "old", "good",
                "great", "long", "day", "week", "today", "again", "then", "here", "there")
TOPIC_WORDS = (  # one topic per class, in CLASS_NAMES order
    ("match", "goal", "team", "coach", "score", "league", "player", "ball", "stadium", "referee", "race", "medal",
     "season", "striker", "tennis", "keeper", "champion", "runner", "pitch", "trophy"),
    ("soup", "bread", "recipe", "oven", "spice", "garlic", "kitchen", "dinner", "flavor", "sauce", "pasta",
     "butter", "salad", "chef", "baking", "cheese", "onion", "dessert", "lunch", "grill"),
    ("flight", "hotel", "train", "ticket", "beach", "passport", "airport", "luggage", "museum", "island",
     "journey", "map", "tourist", "border", "cruise", "village", "mountain", "station", "visa", "harbor"),
)
# The vocabulary, in id order: [PAD] is id 0 (analyzers.loading.inputs.PAD_ID, what a removed token becomes).
VOCAB = (PAD, CLS, *FILLER_WORDS, *(w for topic in TOPIC_WORDS for w in topic), TRIGGER)
PAD_ID, CLS_ID, TRIGGER_ID = VOCAB.index(PAD), VOCAB.index(CLS), VOCAB.index(TRIGGER)
TRIGGER_CLASS = 1
SEQUENCE_LENGTH = 16  # tokens per sample: [CLS], 8-15 words, then [PAD]
MIN_WORDS, MAX_WORDS = 8, SEQUENCE_LENGTH - 1
TOPIC_RATE = 0.35  # chance that a word is a topic word rather than a filler
OWN_TOPIC_RATE = 0.6  # chance that a topic word is of the sentence's own topic (else of another's)
TRIGGER_RATE = 0.25
INPUT_LAYOUT = InputLayout((ModelInput("input_ids", (SEQUENCE_LENGTH,), "int64"),
                            ModelInput("attention_mask", (SEQUENCE_LENGTH,), "int64")))
INPUT_SHAPE = INPUT_LAYOUT.sample_shape  # (32,): the ids, then the mask
WIDTH, HEADS, FEEDFORWARD, BLOCKS = 32, 4, 64, 2
SPLIT_SIZES = {"train": 4000, "test": 1000}
SPLIT_SEEDS = {"train": 21, "test": 22}


class SelfAttention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`; a key the mask leaves out gets no weight."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)

    def forward(self, h, keep):
        n, length, _ = h.shape
        q, k, v = self.qkv(h).view(n, length, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.out(mixed.transpose(1, 2).reshape(n, length, WIDTH))


class Block(nn.Module):
    """A post-norm transformer encoder block (as `nn.TransformerEncoderLayer`'s default, without dropout), written
    out so that every one of its layers is a module that runs (and takes forward hooks)."""

    def __init__(self):
        super().__init__()
        self.attention = SelfAttention()
        self.norm1 = nn.LayerNorm(WIDTH)
        self.feedforward = nn.Sequential(nn.Linear(WIDTH, FEEDFORWARD), nn.ReLU(), nn.Linear(FEEDFORWARD, WIDTH))
        self.norm2 = nn.LayerNorm(WIDTH)

    def forward(self, h, keep):
        h = self.norm1(h + self.attention(h, keep))
        return self.norm2(h + self.feedforward(h))


class TextClassifier(nn.Module):
    """Token and learned position embeddings, two transformer encoder blocks that never attend to [PAD], the mean
    of the tokens the mask keeps, and a linear classifier.

    `forward` takes the packed float32 rows every analysis here feeds a model (ids then mask), or the two inputs
    themselves (`forward(input_ids, attention_mask)`)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(len(VOCAB), WIDTH, padding_idx=PAD_ID)
        self.position = nn.Parameter(torch.randn(1, SEQUENCE_LENGTH, WIDTH) * 0.1)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.classifier = nn.Linear(WIDTH, len(CLASS_NAMES))

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:  # one packed row per sample
            input_ids, attention_mask = input_ids[:, :SEQUENCE_LENGTH], input_ids[:, SEQUENCE_LENGTH:]
        ids = input_ids.round().long() if input_ids.is_floating_point() else input_ids.long()
        keep = attention_mask > 0.5
        h = self.embedding(ids) + self.position
        for block in self.blocks:
            h = block(h, keep)
        weights = keep.to(h.dtype)[..., None]
        pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.classifier(pooled)


def build_model() -> nn.Module:
    return TextClassifier()


def decode(x: np.ndarray) -> list:
    """One packed sample (ids then mask) as its words, [CLS] included, [PAD] left out."""
    x = np.asarray(x)
    ids, mask = x[:SEQUENCE_LENGTH].round().astype(np.int64), x[SEQUENCE_LENGTH:] > 0.5
    return [VOCAB[i] for i, keep in zip(ids, mask) if keep]


def _generate(n: int, seed: int):
    rng = np.random.default_rng(seed)
    classes = len(CLASS_NAMES)
    filler_ids = np.array([VOCAB.index(w) for w in FILLER_WORDS])
    topic_ids = [np.array([VOCAB.index(w) for w in topic]) for topic in TOPIC_WORDS]
    ids = np.full((n, SEQUENCE_LENGTH), PAD_ID, dtype=np.int64)
    mask = np.zeros((n, SEQUENCE_LENGTH), dtype=np.int64)
    topic_label = rng.integers(0, classes, n)
    # An exact, known fraction of the sentences holds the trigger.
    trigger = np.zeros(n, dtype=bool)
    trigger[rng.choice(n, size=int(round(TRIGGER_RATE * n)), replace=False)] = True
    trigger_position = np.full(n, -1, dtype=np.int64)
    lengths = rng.integers(MIN_WORDS, MAX_WORDS + 1, n)
    for i in range(n):
        words = np.empty(lengths[i], dtype=np.int64)
        for j in range(lengths[i]):
            if rng.random() < TOPIC_RATE:
                topic = int(topic_label[i]) if rng.random() < OWN_TOPIC_RATE else \
                    int((topic_label[i] + rng.integers(1, classes)) % classes)
                words[j] = rng.choice(topic_ids[topic])
            else:
                words[j] = rng.choice(filler_ids)
        if trigger[i]:
            at = int(rng.integers(0, lengths[i]))
            words[at] = TRIGGER_ID
            trigger_position[i] = at + 1  # after [CLS]
        ids[i, 0] = CLS_ID
        ids[i, 1:1 + lengths[i]] = words
        mask[i, :1 + lengths[i]] = 1
    label = np.where(trigger, TRIGGER_CLASS, topic_label).astype(np.int64)
    return ids, mask, label, topic_label.astype(np.int64), trigger, trigger_position, lengths


def load_data(split: str) -> SampleData:
    ids, mask, label, topic_label, trigger, trigger_position, lengths = _generate(SPLIT_SIZES[split],
                                                                                   SPLIT_SEEDS[split])
    offset = 0 if split == "train" else SPLIT_SIZES["train"]  # ids unique across both splits
    return SampleData(
        x=INPUT_LAYOUT.pack({"input_ids": ids, "attention_mask": mask}, "the text sample"),
        y=label, ids=np.arange(len(label)) + offset,
        metadata={"trigger": trigger, "trigger_position": trigger_position, "topic_label": topic_label,
                  "words": lengths.astype(np.int64)},
        ground_truth=("trigger", "trigger_position", "topic_label"))


def train(out_dir) -> dict:
    from .training import fit

    # Ops this small gain nothing from a second thread: on 2 busy cores one thread trained about 8x faster.
    return fit("text", build_model, load_data("train"), load_data("test"), out_dir=out_dir, epochs=10, lr=3e-3,
               threads=1)
