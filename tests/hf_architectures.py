"""Hugging Face `transformers` models built from small configs with random weights (no download), wrapped as the
README says: a program must return a tensor, so each wrapper calls the model with `return_dict=False`.

They are also import-path architectures (`--arch hf_architectures:vision_classifier --arch-kwargs '{...}'`): the
same seed and keyword arguments build the same module, whose state dict a run then loads."""
from __future__ import annotations

import torch
import transformers
from torch import nn


class ImageLogits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values, return_dict=False)[0]


class TextLogits(nn.Module):
    """Token ids plus an attention mask: a program of two int64 inputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


def vision_classifier(kind: str, num_labels: int = 4, seed: int = 0) -> nn.Module:
    """A ResNet (bottleneck blocks), ConvNeXt or ViT on 3x32x32 images."""
    torch.manual_seed(seed)
    if kind == "resnet":
        config = transformers.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                           layer_type="bottleneck", num_labels=num_labels)
        model = transformers.ResNetForImageClassification(config)
    elif kind == "convnext":
        config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                             num_labels=num_labels)
        model = transformers.ConvNextForImageClassification(config)
    elif kind == "vit":
        config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                        num_labels=num_labels)
        model = transformers.ViTForImageClassification(config)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return ImageLogits(model.eval()).eval()


def text_classifier(num_labels: int = 3, vocab_size: int = 50, length: int = 12, seed: int = 0) -> nn.Module:
    """A one-layer BERT sequence classifier on `length` token ids and their attention mask."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=length + 4,
                                     num_labels=num_labels)
    return TextLogits(transformers.BertForSequenceClassification(config).eval()).eval()
