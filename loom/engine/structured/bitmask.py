"""Token bitmasks: one int32 row of ceil(vocab / 32) words per sequence, bit t set = token t allowed.

`apply_bitmask` (the fast path) and `apply_bitmask_ref` (its plain twin) set the logits of disallowed tokens
to -inf in place, for the rows that have a grammar. The logits may be wider than the mask (a model's
embedding padded past the tokenizer's vocabulary): those columns are never allowed.
"""

from __future__ import annotations

import sys

import torch

_LUTS: dict[torch.device, torch.Tensor] = {}


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(rows: int, vocab_size: int, pin_memory: bool = False) -> torch.Tensor:
    """An int32 [rows, ceil(vocab_size / 32)] mask on CPU with every token allowed.

    pin_memory lets the engine copy filled rows to a GPU without a sync.
    """
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32, pin_memory=pin_memory)


def _blocked_lut(device: torch.device) -> torch.Tensor:
    """[256, 8] uint8 (0/1, viewed as bool later): bit j of byte value b is clear (that token is blocked)."""
    lut = _LUTS.get(device)
    if lut is None:
        values = torch.arange(256, dtype=torch.int32, device=device)
        shifts = torch.arange(8, dtype=torch.int32, device=device)
        lut = _LUTS[device] = (((values.unsqueeze(1) >> shifts) & 1) == 0).to(torch.uint8)
    return lut


def _rows_index(rows: list[int] | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if rows is None:
        return None
    return torch.as_tensor(rows, dtype=torch.long).to(device, non_blocking=True)


def apply_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | torch.Tensor | None = None
) -> None:
    """Mask logits [num_rows, vocab] in place: row r keeps only the tokens set in bitmask[r].

    rows: the logits rows that have a grammar (None: all of them); bitmask row r goes with logits row r,
    so bitmask has at least num_rows rows. The mask may live on CPU; it is copied to the logits' device.
    """
    if isinstance(rows, torch.Tensor):
        rows = rows.tolist()
    if rows is not None and len(rows) == 0:
        return
    num_rows, vocab = logits.shape
    if rows is not None and len(rows) == num_rows and list(map(int, rows)) == list(range(num_rows)):
        rows = None  # every row: one in-place fill of the whole tensor
    words = bitmask.shape[1]
    index = _rows_index(rows, bitmask.device)
    masks = bitmask[:num_rows] if index is None else bitmask.index_select(0, index)
    masks = masks.to(logits.device, non_blocking=True).contiguous()
    n = masks.shape[0]
    if sys.byteorder == "little":
        # Bytes of a little-endian int32 word hold its bits 0-7, 8-15, ...: a 256-entry table turns each
        # byte into 8 flags, one gather for the whole batch instead of 32 shifts per word.
        # index_select with an int32 index is the fastest gather on CPU (advanced indexing is ~8x slower).
        index_bytes = masks.view(torch.uint8).reshape(-1).int()  # [n * words * 4]
        blocked = (
            _blocked_lut(logits.device).index_select(0, index_bytes).view(torch.bool).view(n, words * 32)
        )
    else:
        shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        blocked = (((masks.unsqueeze(-1) >> shifts) & 1) == 0).view(n, words * 32)
    covered = min(vocab, words * 32)
    if index is None:
        logits[:, :covered].masked_fill_(blocked[:, :covered], float("-inf"))
        if vocab > covered:
            logits[:, covered:] = float("-inf")
        return
    # A subset: fill each row in place (a view), rather than gathering the rows and scattering them back.
    for i, row in enumerate(rows):
        logits[row, :covered].masked_fill_(blocked[i, :covered], float("-inf"))
        if vocab > covered:
            logits[row, covered:] = float("-inf")


def apply_bitmask_ref(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | torch.Tensor | None = None
) -> None:
    """The plain twin of apply_bitmask: row by row, token t allowed iff bit t % 32 of word t // 32 is set."""
    num_rows, vocab = logits.shape
    words = bitmask.shape[1]
    rows = range(num_rows) if rows is None else [int(r) for r in rows]
    token = torch.arange(vocab)
    word = token // 32
    in_mask = word < words
    for r in rows:
        row_words = bitmask[r].cpu()[word.clamp(max=words - 1)]
        allowed = in_mask & (((row_words >> (token % 32)) & 1) == 1)
        logits[r, ~allowed.to(logits.device)] = float("-inf")
