"""Batching: training examples, pretraining text in blocks, packing, and padding, in one place.

Left padding is for anything that generates or reads a response after a prompt (sampling, PPO, SFT's loss on the
response); right padding for scoring whole sequences at their last token (the reward model, DPO).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from instructgpt.config import ConfigError, DataConfig
from instructgpt.data import DataError, Loaded, encode_each, iter_pretrain_text, load_prompts
from instructgpt.prompting import encode_prompt


@dataclass
class Example:
    """One training row: token ids and which of them carry loss; a packed row also has each token's position within
    its own example (`pack`)."""

    input_ids: list[int]
    loss_mask: list[bool]
    position_ids: Optional[list[int]] = None

    @property
    def n_loss_tokens(self) -> int:
        """Tokens the loss is taken over: the trainable ones after the first (which nothing predicts)."""
        return sum(self.loss_mask[1:])


@dataclass
class Seq2SeqExample:
    """One training row of an encoder-decoder model: the encoder reads `input_ids` (the prompt), the decoder is fed
    `decoder_input_ids` (the decoder start token, then the response but its last token) and predicts `labels` (the
    response, EOS included), every one of which carries loss."""

    input_ids: list[int]
    decoder_input_ids: list[int]
    labels: list[int]

    @property
    def n_loss_tokens(self) -> int:
        return len(self.labels)


class TokenBlocks(Sequence[Example]):
    """Blocks of pretraining text held as one (N, block_size) int32 tensor, `ids`: 4 bytes a token where lists of
    Python ints take about 39 (32M tokens of ptx text: 128 MB instead of 1.25 GB, on every rank). Indexing gives an
    `Example` with every token trainable; slicing gives `TokenBlocks`."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return TokenBlocks(self.ids[i])
        row = self.ids[i].tolist()
        return Example(row, [True] * len(row))


DOCS_PER_BATCH = 256  # documents tokenised per call: batched calls are faster than one document at a time


def text_blocks(tokenizer, texts: Iterable[str], block_size: int, max_tokens: int | None = None) -> TokenBlocks:
    """Pretraining text -> documents joined by EOS, cut into full blocks (every token trainable). With `max_tokens`,
    the blocks of the first max_tokens tokens: documents are read (and tokenised) only until there are that many; a
    batch is the documents still wanted at the mean length so far, at most as many as read so far (the first is one
    document), so at most twice the documents needed are read."""
    tail = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    docs, parts, n_tokens, n_docs = iter(texts), [], 0, 0
    while max_tokens is None or n_tokens < max_tokens:
        size = DOCS_PER_BATCH
        if max_tokens is not None:
            wanted = math.ceil((max_tokens - n_tokens) * n_docs / n_tokens) if n_tokens else 1
            size = max(1, min(size, n_docs, wanted))  # at most doubling: never more than twice the documents needed
        batch = list(itertools.islice(docs, size))
        if not batch:
            break
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        parts.append(torch.tensor([t for ids in encoded for t in ids + tail], dtype=torch.int32))
        n_tokens, n_docs = n_tokens + len(parts[-1]), n_docs + len(batch)
    stream = torch.cat(parts)[:max_tokens] if parts else torch.zeros(0, dtype=torch.int32)
    n = len(stream) // block_size
    return TokenBlocks(stream[: n * block_size].reshape(n, block_size))


def pretrain_blocks(tokenizer, data: DataConfig) -> TokenBlocks:
    """`data.pretrain` in blocks of `data.max_length` tokens, of its first `data.pretrain_max_tokens` tokens where
    that is set (a Hugging Face dataset is then streamed, so a corpus like OpenWebText is read only that far)."""
    capped = data.pretrain_max_tokens is not None
    blocks = text_blocks(tokenizer, iter_pretrain_text(data.pretrain, streaming=capped), data.max_length,
                         data.pretrain_max_tokens)
    if not blocks:
        raise DataError(data.pretrain, None, None, f"less than one block of data.max_length={data.max_length} tokens")
    return blocks


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Concatenate examples into rows of at most `max_length` tokens (greedy, in order); masks travel along, and the
    positions restart at each example, which is what keeps the examples of a row apart (`response_loss_sum`)."""
    rows, ids, mask, pos = [], [], [], []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_length:
            rows.append(Example(ids, mask, pos))
            ids, mask, pos = [], [], []
        ids, mask, pos = ids + ex.input_ids, mask + ex.loss_mask, pos + list(range(len(ex.input_ids)))
    if ids:
        rows.append(Example(ids, mask, pos))
    return rows


def collate(examples: Sequence[Example], pad_token_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded (or `left`-padded) (B, T) input_ids, attention_mask and labels (-100 where no loss); for packed
    rows also position_ids, the padding numbered as a sequence of its own."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    att = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    packed = any(e.position_ids is not None for e in examples)
    pos = torch.arange(width).repeat(len(examples), 1) if packed else None
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        span = slice(width - n, width) if left else slice(0, n)
        ids[i, span] = torch.tensor(e.input_ids)
        att[i, span] = 1
        labels[i, span] = torch.where(torch.tensor(e.loss_mask), ids[i, span], torch.tensor(-100))
        if packed:
            pos[i] = torch.arange(width) - (0 if left else n)  # the padding: 0, 1, ... a sequence of its own
            pos[i, span] = torch.tensor(e.position_ids if e.position_ids is not None else list(range(n)))
    batch = {"input_ids": ids, "attention_mask": att, "labels": labels}
    if packed:
        batch["position_ids"] = pos
    return batch


def collate_seq2seq(examples: Sequence[Seq2SeqExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded encoder inputs (B, S) input_ids and attention_mask, and right-padded decoder inputs and labels
    (B, R), the labels -100 on the padding. The decoder is causal, so its right padding needs no mask."""
    S = max(len(e.input_ids) for e in examples)
    R = max(len(e.labels) for e in examples)
    ids = torch.full((len(examples), S), pad_token_id, dtype=torch.long)  # (B, S)
    att = torch.zeros((len(examples), S), dtype=torch.long)  # (B, S)
    dec = torch.full((len(examples), R), pad_token_id, dtype=torch.long)  # (B, R)
    labels = torch.full((len(examples), R), -100, dtype=torch.long)  # (B, R)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        att[i, :len(e.input_ids)] = 1
        dec[i, :len(e.labels)] = torch.tensor(e.decoder_input_ids, dtype=torch.long)
        labels[i, :len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": att, "decoder_input_ids": dec, "labels": labels}


def split_eval(examples: list[Example], eval_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold `eval_size` examples out of training (seeded), when no separate eval set is given."""
    if eval_size <= 0 or len(examples) <= eval_size * 2:
        return examples, []
    g = torch.Generator().manual_seed(seed + 7)
    perm = torch.randperm(len(examples), generator=g).tolist()
    held = set(perm[:eval_size])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def prompt_ids(tokenizer, source: str, max_length: int, skip_bad: bool = False, limit: int | None = None,
               records: Loaded | None = None) -> tuple[list, list[list[int]], int]:
    """A prompt source's prompts (messages) and their token ids, the first `limit` usable ones: -> (prompts, ids,
    skipped). One longer than `max_length` tokens is a DataError naming its file and line, or with `skip_bad` a
    counted skip. `records`: the source already read (`load_prompts` with the same `skip_bad`)."""
    if records is None:
        records = load_prompts(source, skip_bad=skip_bad)

    def encode(r) -> list[int]:
        q = encode_prompt(tokenizer, r.messages)
        if len(q) > max_length:
            raise DataError(r.file, r.line, "prompt",
                            f"prompt is {len(q)} tokens, longer than data.max_length={max_length}")
        return q

    encoded, skipped = encode_each(records, encode, skip_bad, limit)
    prompts, ids, skipped = [r.messages for r, _ in encoded], [q for _, q in encoded], records.skipped + skipped
    if not ids:
        raise ConfigError(f"data: no usable prompts in {source}")
    return prompts, ids, skipped


# --------------------------------------------------------------------------------------------------------------------
# Padding


def left_pad(seqs: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (B, max_len), padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (B, max_len), padded on the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def length_groups(lengths: Sequence[int] | Sequence[tuple[int, ...]], groups: int) -> list[list[int]]:
    """The rows of a micro-batch in at most `groups` groups of similar length, chosen so that padding each group to
    its own longest row pads the fewest tokens (a split of the rows sorted by length, by dynamic programming).
    Each group's indices in their original order. The groups' summed losses and gradients are the whole batch's.

    A row's length may be a tuple of lengths padded apart (PPO's left-padded query and right-padded response): a
    group then costs its rows times the sum of its longest of each, and the split is the best of those of the rows
    sorted by each length and by their sum."""
    sizes = [tuple(x) if isinstance(x, (tuple, list)) else (x,) for x in lengths]
    n, g_max = len(sizes), max(1, min(groups, len(sizes)))
    keys = [lambda i: sizes[i]] if all(len(x) == 1 for x in sizes) else (
        [lambda i: sum(sizes[i])] + [lambda i, d=d: (sizes[i][d], sum(sizes[i])) for d in range(len(sizes[0]))])
    best_cost, best_split = float("inf"), None
    for key in keys:
        cost, split = _split_sorted(sorted(range(n), key=key), sizes, g_max)
        if cost < best_cost:
            best_cost, best_split = cost, split
    return best_split


def _split_sorted(order: list[int], sizes: list[tuple[int, ...]], g_max: int) -> tuple[float, list[list[int]]]:
    """`length_groups` for one order of the rows: its best split into at most g_max runs, and that split's cost."""
    n, dims = len(order), len(sizes[order[0]])
    # best[g][j]: the fewest padded tokens of the first j rows in g groups; rows i..j-1 as one group cost (j - i)
    # times the sum of their longest of each length
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(g_max + 1)]
    cut = [[0] * (n + 1) for _ in range(g_max + 1)]
    best[0][0] = 0
    for g in range(1, g_max + 1):
        for j in range(g, n + 1):
            longest = [0] * dims
            for i in range(j - 1, g - 2, -1):  # the group order[i:j], grown one row to the left at a time
                longest = [max(a, b) for a, b in zip(longest, sizes[order[i]])]
                c = best[g - 1][i] + (j - i) * sum(longest)
                if c <= best[g][j]:
                    best[g][j], cut[g][j] = c, i
    g = min(range(1, g_max + 1), key=lambda k: (best[k][n], k))  # the fewest groups that pad the fewest tokens
    out, j = [], n
    total = best[g][n]
    while g:
        i = cut[g][j]
        out.append(sorted(order[i:j]))
        j, g = i, g - 1
    return total, out[::-1]
