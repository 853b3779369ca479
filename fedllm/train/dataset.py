"""Examples → token batches, with the loss on the answer only.

A prompt template turns an Example into (prompt, response); the labels of the
prompt tokens are -100 so the loss covers the response (and the closing EOS)
only — the seed's "answer-only loss".
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from fedllm.data.prompts import format_example
from fedllm.data.records import Example

IGNORE_INDEX = -100


def tokenize_example(tokenizer, example: Example, template: str, max_length: int, answer_only: bool = True) -> dict:
    prompt, response = format_example(example, template)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) if answer_only else list(prompt_ids)) + response_ids
    labels = labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


class TokenizedExamples(Dataset):
    """Tokenized once up front: a site's data is small next to its training time."""

    def __init__(self, examples: Sequence[Example], tokenizer, template: str, max_length: int, answer_only: bool = True):
        items = [tokenize_example(tokenizer, e, template, max_length, answer_only) for e in examples]
        # An example whose answer was cut off entirely carries no loss: drop it.
        self.items = [it for it in items if any(label != IGNORE_INDEX for label in it["labels"][1:])]
        self.dropped = len(items) - len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    @property
    def num_tokens(self) -> int:
        return sum(len(it["input_ids"]) for it in self.items)


class PackedExamples(Dataset):
    """Several examples per row, up to ``max_length`` tokens, so no compute goes
    to padding. Labels keep each example's answer-only mask; attention spans the
    row (the usual packing trade-off, kept off by default)."""

    def __init__(self, tokenized: TokenizedExamples, max_length: int):
        rows, cur_ids, cur_labels = [], [], []
        for it in tokenized.items:
            if cur_ids and len(cur_ids) + len(it["input_ids"]) > max_length:
                rows.append({"input_ids": cur_ids, "labels": cur_labels})
                cur_ids, cur_labels = [], []
            cur_ids = cur_ids + it["input_ids"]
            cur_labels = cur_labels + it["labels"]
        if cur_ids:
            rows.append({"input_ids": cur_ids, "labels": cur_labels})
        self.items = rows

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(pad_token_id: int):
    def fn(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            input_ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            attention[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}

    return fn


def make_loader(dataset: Dataset, batch_size: int, pad_token_id: int, shuffle: bool, seed: Optional[int] = None) -> DataLoader:
    generator = None
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed or 0)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate(pad_token_id), generator=generator, num_workers=0)
