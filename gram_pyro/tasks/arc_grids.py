"""ARC grids as canvases, and their augmentation: the encoding and the transforms the ARC tasks
(:mod:`gram_pyro.tasks.arc`) build on.

Encoding (as HRM/TRM): a grid of ``r x c`` (1..30 rows and columns, colours 0..9) becomes a 30x30 canvas
read row-major, ``S = 900`` tokens, vocabulary 12: ``0`` pad, ``1`` EOS, ``2 + k`` colour ``k``. The grid
sits at the top-left; EOS marks its end on row ``r`` over columns ``0..c-1`` (when ``r < 30``) and on
column ``c`` over rows ``0..r-1`` (when ``c < 30``); the corner ``(r, c)`` and everything else is pad.
Example, a 2x3 grid::

    C C C E . .
    C C C E . .
    E E E . . .
    . . . . . .

Decoding reads up to the EOS marks: ``rows`` = the run of colours down column 0, ``cols`` = the run
along row 0; the canvas is well formed when the ``rows x cols`` block is all colours and both EOS
marks are complete. Pad positions are not read (the model is not trained on them), so
``canonical(canvas)`` = encode(decode(canvas)) clears them; a malformed canvas has no grid.

Augmentation: one of the 8 dihedral transforms (ids in :data:`DIHEDRAL_NAMES`; id bits = transpose,
flip rows, flip columns of the source, in that order) and a permutation of colours 1..9 (black kept),
the same for ``x`` and ``y``. :func:`transform_canvas` applies both to canvases ``[..., 900]`` with
index gathers and selects vectorized over the batch, keeping the grid at the top-left; it never decodes.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

SIDE = 30
SEQ_LEN = SIDE * SIDE
PAD, EOS, COLOUR_OFFSET = 0, 1, 2
NUM_COLOURS = 10
VOCAB_SIZE = COLOUR_OFFSET + NUM_COLOURS
BLACK = COLOUR_OFFSET
"""The token of colour 0, kept fixed by colour permutations."""

DIHEDRAL_NAMES = ("identity", "flip_columns", "flip_rows", "rotate_180",
                  "transpose", "rotate_90", "rotate_270", "anti_transpose")
"""Dihedral transform ids; ``rotate_90`` turns counter-clockwise (``numpy.rot90``)."""
INVERSE_DIHEDRAL = torch.tensor([0, 1, 2, 3, 4, 6, 5, 7])
"""``INVERSE_DIHEDRAL[d]`` undoes dihedral ``d``."""


# ----------------------------------------------------------------------------------------- encoding

def layout(rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool masks ``(inside, eos)`` ``[..., 30, 30]`` for grids of ``rows x cols`` (``[...]``): the
    top-left block and its EOS marks (row ``rows`` left of ``cols``, column ``cols`` above ``rows``)."""
    i = torch.arange(SIDE, device=rows.device)
    row_in, col_in = i < rows[..., None], i < cols[..., None]
    row_end, col_end = i == rows[..., None], i == cols[..., None]
    inside = row_in[..., :, None] & col_in[..., None, :]
    eos = (row_end[..., :, None] & col_in[..., None, :]) | (row_in[..., :, None] & col_end[..., None, :])
    return inside, eos


def canvas_from_cells(cells: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Canvas ``[..., 900]``: ``cells [..., 30, 30]`` inside the top-left ``rows x cols`` block
    (``rows``, ``cols`` ``[...]``), the EOS marks right of and below it, pad elsewhere."""
    inside, eos = layout(rows, cols)
    frame = torch.where(eos, cells.new_tensor(EOS), cells.new_tensor(PAD))
    return torch.where(inside, cells, frame).flatten(-2)


def encode_grids(grids: Iterable) -> torch.Tensor:
    """LongTensor ``[P, 900]``: the canvases of ``P`` grids (each array-like ``[r, c]`` of colours 0..9,
    1 <= r, c <= 30). A grid outside those bounds is a ``ValueError``."""
    grids = [np.asarray(grid) for grid in grids]
    cells = np.zeros((len(grids), SIDE, SIDE), dtype=np.int64)
    shapes = np.zeros((len(grids), 2), dtype=np.int64)
    for k, grid in enumerate(grids):
        if grid.ndim != 2 or not (1 <= grid.shape[0] <= SIDE and 1 <= grid.shape[1] <= SIDE):
            raise ValueError(f"an ARC grid has 1..{SIDE} rows and columns, got shape {grid.shape}")
        if not (0 <= grid.min() and grid.max() < NUM_COLOURS):
            raise ValueError(f"ARC colours are 0..{NUM_COLOURS - 1}, got {grid.min()}..{grid.max()}")
        cells[k, :grid.shape[0], :grid.shape[1]] = grid
        shapes[k] = grid.shape
    shapes = torch.from_numpy(shapes)
    return canvas_from_cells(torch.from_numpy(cells) + COLOUR_OFFSET, shapes[:, 0], shapes[:, 1])


def encode(grid) -> torch.Tensor:
    """LongTensor ``[900]``: the canvas of one grid (array-like ``[r, c]`` of colours 0..9)."""
    return encode_grids([grid])[0]


def _colour_run(line: torch.Tensor) -> torch.Tensor:
    """``[...]``: how many colour tokens ``line [..., 30]`` starts with."""
    return ((line >= COLOUR_OFFSET) & (line < VOCAB_SIZE)).long().cumprod(-1).sum(-1)


def grid_shape(canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` ``[...]`` of canvases ``[..., 900]``: the runs of colour tokens from the top-left
    corner down column 0 and along row 0."""
    cells = canvas.unflatten(-1, (SIDE, SIDE))
    return _colour_run(cells[..., :, 0]), _colour_run(cells[..., 0, :])


def canonical(canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(encode(decode(canvas)) [..., 900], well_formed [...])`` for canvases ``[..., 900]``, vectorized.

    Well formed: the ``rows x cols`` block of :func:`grid_shape` is all colours and both EOS marks are
    complete; pad positions are not read. A malformed canvas maps to the all-pad canvas (no grid)."""
    rows, cols = grid_shape(canvas)
    cells = canvas.unflatten(-1, (SIDE, SIDE))
    inside, eos = layout(rows, cols)
    colour = (cells >= COLOUR_OFFSET) & (cells < VOCAB_SIZE)
    as_expected = torch.where(inside, colour, (cells == EOS) | ~eos)
    valid = as_expected.flatten(-2).all(-1) & (rows > 0)
    return canvas_from_cells(cells, rows * valid, cols * valid), valid


def decode(canvas: torch.Tensor) -> torch.Tensor | None:
    """The grid LongTensor ``[rows, cols]`` (colours 0..9) of one canvas ``[900]``; ``None`` if malformed."""
    clean, valid = canonical(canvas)
    if not valid:
        return None
    rows, cols = grid_shape(clean)
    return clean.view(SIDE, SIDE)[:rows, :cols] - COLOUR_OFFSET


# ------------------------------------------------------------------------------------- augmentation

def transform_canvas(canvas: torch.Tensor, dihedral: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Canvases ``[..., 900]`` with their grids put through dihedral ``[...]`` (ids of
    :data:`DIHEDRAL_NAMES`) and then the token map ``palette [..., 12]``, re-framed at the top-left.

    The grid's rows and/or columns are reversed within the ``rows x cols`` block (flip bits), then
    transposed (transpose bit), then framed anew at the top-left; each step is one gather or select.
    Any canvas is accepted: a malformed one yields some framed block (callers judge before)."""
    rows, cols = grid_shape(canvas)
    i = torch.arange(SIDE, device=canvas.device)
    source_row = torch.where((dihedral[..., None] & 2) > 0, rows[..., None] - 1 - i, i).clamp(min=0)
    source_col = torch.where((dihedral[..., None] & 1) > 0, cols[..., None] - 1 - i, i).clamp(min=0)
    cells = canvas.unflatten(-1, (SIDE, SIDE))
    cells = cells.gather(-2, source_row[..., :, None].expand_as(cells))
    cells = cells.gather(-1, source_col[..., None, :].expand_as(cells))
    transpose = dihedral >= 4
    cells = torch.where(transpose[..., None, None], cells.transpose(-1, -2), cells)
    framed = canvas_from_cells(cells, torch.where(transpose, cols, rows), torch.where(transpose, rows, cols))
    return palette.gather(-1, framed)


def inverse_transform_canvas(canvas: torch.Tensor, dihedral: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Undo :func:`transform_canvas` with the same ``dihedral [...]`` and ``palette [..., 12]``."""
    return transform_canvas(canvas, INVERSE_DIHEDRAL.to(dihedral.device)[dihedral], palette.argsort(-1))


def identity_palette(count: int) -> torch.Tensor:
    """LongTensor ``[count, 12]``: the token map that changes nothing."""
    return torch.arange(VOCAB_SIZE).expand(count, VOCAB_SIZE)


def random_augmentation(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dihedral [count], palette [count, 12])``: uniform dihedral ids and token maps that permute
    colours 1..9 uniformly and keep pad, EOS and black."""
    dihedral = torch.randint(len(DIHEDRAL_NAMES), (count,), generator=generator)
    moved = torch.rand(count, NUM_COLOURS - 1, generator=generator).argsort(-1) + BLACK + 1
    return dihedral, torch.cat([identity_palette(count)[:, :BLACK + 1], moved], -1)
