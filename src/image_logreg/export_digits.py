"""The digit normalisation of ``preprocess.prepare_image`` as tensor operations, for an exported graph.

``DigitNormalization`` takes gray uint8 images of any size (``N x H x W``, as ``Image.convert("L")``
gives them) and returns what ``prepare_image`` makes of such a file: white ink on black, fitted
into the box and centred by mass. Each step follows its numpy original in preprocess.py, batched,
and written without a Python branch on a pixel or a size (sizes are tensors, choices are
``torch.where``, computing both sides), so that tracing records one graph for every size and
content. Where ``normalize_digit`` raises "blank image", the image is flagged in ``blank`` instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import preprocess as pp

# numpy computes percentile positions, the plane's fit and Pillow's filter weights in float64; so here.
_WIDE = torch.float64


class DigitNormalization(nn.Module):
    """uint8 ``N x H x W`` gray images in; uint8 ``N x size`` digits and a bool ``N`` blank flag out."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.box = pp.digit_box(self.size)
        self.working_side = max(pp.WORKING_SIDE, 8 * max(self.size))  # as prepare_image reads a file
        self.doublings = doublings_for(self.working_side)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gray = reduced(images, self.working_side).float() / 255.0
        ink, found = ink_on_black(gray, self.doublings)
        glyph, glyph_h, glyph_w = fit_in_box(ink, self.box, self.size)
        digits, has_mass = centre_by_mass(glyph, glyph_h, glyph_w, self.size)
        kept = already_dataset_form(images, self.size)
        digits = torch.where(kept[:, None, None], canvas_of(images, self.size), to_uint8(digits))
        return digits, ~kept & ~(found & has_mass)


def _side(x: torch.Tensor, axis: int) -> torch.Tensor:
    # A tensor in eager mode too, so the arithmetic is the same as traced (where sizes are tensors).
    return torch.as_tensor(x.shape[axis])


def to_uint8(unit: torch.Tensor) -> torch.Tensor:
    return torch.round(unit * 255.0).clamp(0, 255).to(torch.uint8)


# --- reading -------------------------------------------------------------------------------------


def reduced(images: torch.Tensor, working_side: int) -> torch.Tensor:
    """Images whose shorter side is at least twice ``working_side`` averaged down by a whole factor,
    as ``prepare_image`` has Pillow's ``reduce`` do it (partial blocks at the right and bottom edges
    average the pixels they have, halves round up); others as they are (float64 0..255).

    Block sums come from running sums, so the usual factor of 1 costs little.
    """
    h, w = _side(images, 1), _side(images, 2)
    factor = (torch.minimum(h, w) // working_side).clamp(min=1)
    sums, rows = _block_sums(images.to(_WIDE), factor, 1)
    sums, cols = _block_sums(sums, factor, 2)
    counts = rows[:, None] * cols[None, :]
    return torch.floor((sums + counts / 2) / counts)


def _block_sums(x: torch.Tensor, factor: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over runs of ``factor`` along ``axis`` (the last run may be shorter), and each run's length."""
    length = _side(x, axis)
    running = torch.cat([torch.zeros_like(x.narrow(axis, 0, 1)), x.cumsum(axis)], axis)
    start = torch.arange((length + factor - 1) // factor) * factor
    stop = torch.minimum(start + factor, length)
    return running.index_select(axis, stop) - running.index_select(axis, start), (stop - start).to(_WIDE)


def already_dataset_form(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``preprocess._already_dataset_form``: images of ``size`` on a dark background are kept as they are."""
    h, w = _side(images, 1), _side(images, 2)
    pixels = images.float()
    border = border_values(pixels, _border_width(h, w))
    dark = pp._DARK * 255
    mostly_dark = (border <= dark).sum(1) >= 0.9 * _side(border, 1)
    return (h == size[0]) & (w == size[1]) & mostly_dark & (pixels.amax((1, 2)) > dark)


def canvas_of(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The images cut or edge-extended to ``size``: their own pixels, where they are that size."""
    rows = torch.arange(size[0]).clamp(max=_side(images, 1) - 1)
    cols = torch.arange(size[1]).clamp(max=_side(images, 2) - 1)
    return images.index_select(1, rows).index_select(2, cols)


# --- the border ----------------------------------------------------------------------------------


def _border_width(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (torch.minimum(h, w) // 40).clamp(min=1)


def _border_strips(x: torch.Tensor, width: torch.Tensor, reach: int = 0) -> tuple[torch.Tensor, ...]:
    """The frame of ``preprocess._border_mask`` as four strips that do not overlap: the top and bottom
    rows, and the left and right columns between them; the right one ``reach`` columns wider inwards."""
    h, w = _side(x, 1), _side(x, 2)
    middle = x[:, width : h - width]
    return x[:, :width], x[:, h - width :], middle[:, :, :width], middle[:, :, (w - width - reach).clamp(min=0) :]


def border_values(x: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """The pixels of ``preprocess._border``'s frame, ``N x B``."""
    return torch.cat([strip.flatten(1) for strip in _border_strips(x, width)], 1)


def border_pairs(x: torch.Tensor, width: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal neighbours (left, right), ``N x P`` each, whose right pixel is in the frame,
    as ``preprocess._paper_noise`` pairs them."""
    strips = _border_strips(x, width, reach=1)
    left = torch.cat([strip[:, :, :-1].flatten(1) for strip in strips], 1)
    right = torch.cat([strip[:, :, 1:].flatten(1) for strip in strips], 1)
    return left, right


# --- order statistics ----------------------------------------------------------------------------


def percentiles(values: torch.Tensor, valid: torch.Tensor, *qs: float) -> tuple[torch.Tensor, ...]:
    """numpy's ``percentile(values[valid], q)`` (linear) along the last axis, for each ``q``; NaN where
    none is valid.

    Only the values from the lowest position asked for up to the largest are sorted (a 90th
    percentile of a whole image sorts a tenth of its ink, not the image).
    """
    masked = torch.where(valid, values, -math.inf)
    # One more value past the end, so that an empty set (a strip of a 1-pixel image) has one to read.
    masked = torch.cat([masked, torch.full_like(valid.sum(-1, keepdim=True), -math.inf, dtype=values.dtype)], -1)
    count = valid.sum(-1, keepdim=True)
    last = (count - 1).clamp(min=0)
    positions = [last.to(_WIDE) * (q / 100.0) for q in qs]
    lows = [position.floor().to(torch.int64) for position in positions]
    k = torch.stack([(count - low).amax() for low in lows]).amax().clamp(min=1)
    descending = torch.topk(masked, k, dim=-1).values  # ascending place p is descending place count - 1 - p

    def at(place: torch.Tensor) -> torch.Tensor:
        return descending.gather(-1, (count - 1 - place).clamp(min=0)).to(_WIDE)

    answers = []
    for position, low in zip(positions, lows):
        t = position - low.to(_WIDE)
        a, b = at(low), at(torch.minimum(low + 1, last))
        between = torch.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)  # numpy's _lerp
        answers.append(torch.where(count > 0, between, math.nan).squeeze(-1))
    return tuple(answers)


def median(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return percentiles(values, valid, 50.0)[0]


# --- the paper -----------------------------------------------------------------------------------

_PIECES = 8  # preprocess._spans: pieces per edge


def _spans(length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    edges = torch.arange(_PIECES + 1) * length // _PIECES  # linspace(0, L, 9) truncated: L * i / 8 is exact
    return edges[:-1], edges[1:]


def _piece_levels(strip: torch.Tensor, axis: int, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """The 25th percentile of each piece (``N x pieces``) of an edge strip ``N x a x b``, cut along ``axis``."""
    position = torch.arange(_side(strip, axis))
    member = (position[None, :] >= start[:, None]) & (position[None, :] < stop[:, None])  # pieces x length
    member = member[:, :, None] if axis == 1 else member[:, None, :]
    values = strip[:, None].expand(-1, _PIECES, -1, -1)
    return percentiles(values.flatten(2), member[None].expand_as(values).flatten(2), 25.0)[0]


def paper_plane(gray: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """``preprocess._background``: a plane fitted to the paper along the four edges, each edge read
    in eight pieces at their 25th percentile, pieces far above the plane (strokes) dropped."""
    h, w = _side(gray, 1), _side(gray, 2)
    col_start, col_stop = _spans(w)
    row_start, row_stop = _spans(h)
    top, bottom, _, _ = _border_strips(gray, width)
    levels = torch.cat([
        _piece_levels(top, 2, col_start, col_stop),
        _piece_levels(bottom, 2, col_start, col_stop),
        _piece_levels(gray[:, :, :width], 1, row_start, row_stop),
        _piece_levels(gray[:, :, w - width :], 1, row_start, row_stop),
    ], 1)
    col_middle, row_middle = (col_start + col_stop - 1).to(_WIDE) / 2, (row_start + row_stop - 1).to(_WIDE) / 2
    zeros = torch.zeros(_PIECES, dtype=_WIDE)
    rows = torch.cat([zeros, zeros + (h - 1).to(_WIDE), row_middle, row_middle])
    cols = torch.cat([col_middle, col_middle, zeros, zeros + (w - 1).to(_WIDE)])
    design = torch.stack([torch.ones_like(rows), rows / h.to(_WIDE), cols / w.to(_WIDE)], 1)  # pieces x 3
    valid = torch.cat([col_stop > col_start, col_stop > col_start, row_stop > row_start, row_stop > row_start])
    valid = valid[None].expand_as(levels)
    levels = torch.where(valid, levels, 0.0)  # an empty piece (a side under 8 pixels) weighs nothing
    start = median(levels, valid)
    coef = torch.stack([start, torch.zeros_like(start), torch.zeros_like(start)], 1)
    for _ in range(3):
        residual = levels - coef @ design.T
        bar = median(residual, valid) + torch.clamp(3 * median(residual.abs(), valid), min=0.01)
        coef = _least_squares(design, levels, valid & (residual <= bar[:, None]), fallback=coef)
    row_term = coef[:, 1, None, None] * torch.arange(h, dtype=_WIDE)[None, :, None] / h.to(_WIDE)
    col_term = coef[:, 2, None, None] * torch.arange(w, dtype=_WIDE)[None, None, :] / w.to(_WIDE)
    return (coef[:, 0, None, None] + row_term + col_term).float()


def _least_squares(design: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """numpy's ``lstsq(design[keep], target[keep])`` per image (3 unknowns) from the normal equations,
    solved by their adjugate (ONNX has no solver); ``fallback`` where the kept pieces pin no plane down."""
    weight = keep.to(_WIDE)
    m = torch.einsum("np,pi,pj->nij", weight, design, design)  # N x 3 x 3
    v = torch.einsum("np,pi,np->ni", weight, design, target)
    a, b, c = m[:, 0], m[:, 1], m[:, 2]
    adjugate = torch.stack([_cross(b, c), _cross(c, a), _cross(a, b)], 2)
    det = (a * _cross(b, c)).sum(1)
    solvable = det.abs() > 1e-12 * m.abs().amax((1, 2)) ** 3
    solution = (adjugate @ v[:, :, None])[:, :, 0] / torch.where(solvable, det, 1.0)[:, None]
    return torch.where(solvable[:, None], solution, fallback)


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row-wise cross product of ``N x 3`` tensors (written out: torch.cross has no ONNX export)."""
    (u0, u1, u2), (v0, v1, v2) = u.unbind(1), v.unbind(1)
    return torch.stack([u1 * v2 - u2 * v1, u2 * v0 - u0 * v2, u0 * v1 - u1 * v0], 1)


def paper_noise(ink: torch.Tensor, clipped: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """``preprocess._paper_noise``: the paper's noise sigma in the frame, from its lower tail and
    from differences of neighbouring pixels, stroke cores left out."""
    not_core = (0.5 * ink.amax((1, 2)))[:, None]
    paper = border_values(ink, width)
    is_paper = paper < not_core
    upper, lower = percentiles(paper, is_paper, 30.9, 6.7)
    spread = torch.where(is_paper.any(1), upper - lower, 0.0)
    left, right = border_pairs(ink, width)
    left_clipped, right_clipped = border_pairs(clipped, width)
    usable = (torch.maximum(left, right) < not_core) & ~(left_clipped & right_clipped)
    step = torch.where(usable.any(1), median((left - right).abs(), usable), 0.0)
    return torch.maximum(spread, 1.4826 * step / math.sqrt(2))


def doublings_for(working_side: int) -> int:
    """How many times ``running_extreme`` doubles its runs to cover any opening's window: the window
    is a third of the shorter side, which is under twice ``working_side`` once the image is reduced."""
    return int((2 * working_side // 3 + 1).bit_length() - 1)


def running_extreme(a: torch.Tensor, k: torch.Tensor, axis: int, doublings: int, largest: bool) -> torch.Tensor:
    """The minimum (maximum, ``largest``) of each centred run of ``k`` (odd) values along ``axis``, edge
    values repeated beyond the ends: ``preprocess._running``.

    Its blocks of ``k`` need a size known when tracing; this doubles instead. Each step makes every
    place hold the extreme of twice as many values from it on, up to the largest power of two
    ``g <= k``; a run of ``k`` is then the extreme of the two runs of ``g`` at its start and its end.
    """
    extreme = torch.maximum if largest else torch.minimum
    n = _side(a, axis)
    length = n + k - 1
    table = a.index_select(axis, (torch.arange(length) - k // 2).clamp(0, n - 1))  # edges repeated
    g = torch.ones_like(k)
    for step in (2**j for j in range(doublings)):
        grows = 2 * step <= k
        # The table ``step`` places on (0 once it has stopped growing), its last value repeated;
        # by slices, several times quicker than a gather.
        shift = torch.where(grows, step, 0)
        if axis == 1:
            ahead = torch.cat([table[:, shift:], table[:, -1:].expand(-1, shift, -1)], 1)[:, :length]
        else:
            ahead = torch.cat([table[:, :, shift:], table[:, :, -1:].expand(-1, -1, shift)], 2)[:, :, :length]
        table = extreme(table, ahead)
        g = torch.where(grows, 2 * g, g)
    places = torch.arange(n)
    return extreme(table.index_select(axis, places), table.index_select(axis, places + k - g))


def opening(image: torch.Tensor, k: torch.Tensor, doublings: int) -> torch.Tensor:
    """``preprocess._opening``: the brightest of the darkest values around each pixel, over ``k x k`` squares."""
    darkest = running_extreme(running_extreme(image, k, 1, doublings, False), k, 2, doublings, False)
    return running_extreme(running_extreme(darkest, k, 1, doublings, True), k, 2, doublings, True)


def _odd_window(side: torch.Tensor) -> torch.Tensor:
    """``max(3, side | 1)``: the next odd number, at least 3."""
    return (side + 1 - side % 2).clamp(min=3)


def block_means(gray: torch.Tensor, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means over the whole ``factor x factor`` blocks (a partial one at an edge left out), and the
    rows and columns where the blocks start."""
    h, w = _side(gray, 1), _side(gray, 2)
    cut = gray.index_select(1, torch.arange(h // factor * factor)).index_select(2, torch.arange(w // factor * factor))
    sums, _ = _block_sums(cut.to(_WIDE), factor, 1)
    sums, _ = _block_sums(sums, factor, 2)
    return (sums / (factor * factor).to(_WIDE)).float(), torch.arange(h // factor) * factor, torch.arange(w // factor) * factor


def paper_level(gray: torch.Tensor, width: torch.Tensor, doublings: int) -> torch.Tensor:
    """``preprocess._paper_level``: the plane along the edges, raised where an opening a third of
    the shorter side wide finds a patch of paper of another tone (a photo pasted on a page)."""
    plane = paper_plane(gray, width)
    shorter = torch.minimum(_side(gray, 1), _side(gray, 2))
    k = _odd_window(torch.floor(shorter.to(_WIDE) * pp._PAPER_PATCH).to(torch.int64))
    # A coarse copy says first whether there is any patch to find; where it finds none, the plane.
    factor = shorter // 32
    coarse, rows, cols = block_means(gray, factor.clamp(min=1))
    coarse_k = _odd_window(k // factor.clamp(min=1))
    seen = opening(coarse, coarse_k, doublings) - plane.index_select(1, rows).index_select(2, cols)
    nothing_coarse = (factor >= 2) & (seen.amax((1, 2)) < pp._MIN_CONTRAST)
    opened = opening(gray, k, doublings)
    patch = (opened > plane + pp._MIN_CONTRAST).flatten(1)
    lift, high = percentiles((gray - opened).flatten(1), patch, 50.0, 99.5)
    # A patch without ink on it is a bold glyph wider than the square: ink, left to the plane.
    bold_glyph = patch.any(1) & (high - lift < pp._INK_ON_PAPER)
    lifted = torch.where(patch.view_as(opened), opened + lift.float()[:, None, None], opened)
    keep_plane = (nothing_coarse | bold_glyph)[:, None, None]
    return torch.where(keep_plane, plane, torch.maximum(plane, lifted))


def ink_on_black(gray: torch.Tensor, doublings: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``preprocess._ink_on_black``: ink strength in [0, 1] on a 0 background, whatever the polarity,
    paper tone and lighting; and whether any ink stands out from the paper (``N``)."""
    width = _border_width(_side(gray, 1), _side(gray, 2))
    border = border_values(gray, width)
    light = median(border, torch.ones_like(border, dtype=torch.bool)) > 0.5
    gray = torch.where(light[:, None, None], 1.0 - gray, gray)  # dark ink on light paper
    level = paper_level(gray, width, doublings)
    ink = (gray - level) / (1.0 - level.clamp(max=pp._DARKEST_PAPER))
    noise = paper_noise(ink, gray == 0.0, width)
    # The plane runs along the paper's darker pixels; lift it to the paper's middle.
    paper = border_values(ink, width)
    is_paper = paper < (0.5 * ink.amax((1, 2)))[:, None]
    ink = ink - torch.where(is_paper.any(1), median(paper, is_paper), 0.0).float()[:, None, None]
    strong = (ink > torch.clamp(pp._NOISE_SIGMAS * noise, min=pp._MIN_CONTRAST).float()[:, None, None]).flatten(1)
    found = strong.any(1)
    # A high percentile, not the max: one hot JPEG pixel must not set the scale.
    scale = torch.where(found, percentiles(ink.flatten(1), strong, 90.0)[0], 1.0).float()[:, None, None]
    ink = torch.clamp(ink / scale, 0.0, 1.0)
    faint = torch.clamp(pp._NOISE_SIGMAS * noise[:, None, None] / scale, pp._FAINT, pp._MAX_FAINT)
    return torch.where(ink < faint, 0.0, ink), found


# --- crop, fit, centre ---------------------------------------------------------------------------


def _extent(marked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index along the last axis where ``marked`` (``N x L``) holds; 0 and L - 1 if nowhere."""
    length = _side(marked, 1)
    index = torch.arange(length)[None]
    first = torch.where(marked, index, length).amin(1)
    last = torch.where(marked, index, -1).amax(1)
    anywhere = marked.any(1)
    return torch.where(anywhere, first, 0), torch.where(anywhere, last, length - 1)


def _sinc(x: torch.Tensor) -> torch.Tensor:
    angle = torch.where(x == 0, 1.0, x * math.pi)
    return torch.where(x == 0, 1.0, torch.sin(angle) / angle)


def lanczos_weights(start: torch.Tensor, length: torch.Tensor, out: torch.Tensor, source: torch.Tensor,
                    canvas: int) -> torch.Tensor:
    """``N x canvas x source``: row i holds the weights Pillow's LANCZOS resize of the source pixels
    ``start .. start + length - 1`` to ``out`` pixels gives them for output pixel i (rows from ``out``
    on are 0). As Pillow's ``precompute_coeffs``: the 3-lobe filter widened by the reduction when
    shrinking (so every source pixel counts: antialiased), clipped to the crop, each row summing to 1.
    """
    start, length, out = start.to(_WIDE), length.to(_WIDE), out.to(_WIDE)
    scale = (length / out)[:, None, None]  # source pixels per output pixel
    filter_scale = scale.clamp(min=1.0)
    support = 3.0 * filter_scale
    centre = (torch.arange(canvas, dtype=_WIDE)[None, :, None] + 0.5) * scale
    # Pillow truncates towards zero, then clips at 0: the same as the floor, clipped
    low = torch.floor(centre - support + 0.5).clamp(min=0.0)
    high = torch.minimum(torch.floor(centre + support + 0.5), length[:, None, None])
    x = torch.arange(source, dtype=_WIDE)[None, None, :] - start[:, None, None]  # in the crop's coordinates
    t = (x - centre + 0.5) / filter_scale
    weights = torch.where((x >= low) & (x < high) & (t >= -3.0) & (t < 3.0), _sinc(t) * _sinc(t / 3.0), 0.0)
    total = weights.sum(2, keepdim=True)
    weights = weights / torch.where(total == 0, 1.0, total)
    return torch.where(torch.arange(canvas)[None, :, None] < out[:, None, None], weights, 0.0)


def fit_in_box(ink: torch.Tensor, box: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``preprocess._crop_to_ink`` then ``_fit_in_box``: the strokes' bounding box scaled (LANCZOS) so
    its longer side is ``box`` (a glyph shorter than a quarter of the page as if that long), aspect
    kept, at the top left of a ``size`` canvas; and its height and width (``N``)."""
    h, w = _side(ink, 1), _side(ink, 2)
    strokes = ink >= pp._STROKE_EDGE
    top, bottom = _extent(strokes.any(2))
    left, right = _extent(strokes.any(1))
    height, width = (bottom - top + 1).to(_WIDE), (right - left + 1).to(_WIDE)
    least = pp.MIN_GLYPH * torch.minimum(h, w).to(_WIDE)
    scale = box / torch.maximum(torch.maximum(height, width), least)
    out_h = torch.round(height * scale).clamp(min=1.0)
    out_w = torch.round(width * scale).clamp(min=1.0)
    rows = lanczos_weights(top, height, out_h, h, size[0])
    cols = lanczos_weights(left, width, out_w, w, size[1])
    glyph = rows @ ink.to(_WIDE) @ cols.transpose(1, 2)
    # Pillow hands back float32; LANCZOS rings a little below 0 and above 1
    return glyph.float().clamp(0.0, 1.0), out_h, out_w


def centre_by_mass(glyph: torch.Tensor, height: torch.Tensor, width: torch.Tensor,
                   size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``preprocess._centre_by_mass``: the glyph moved so its centre of mass lands at the canvas
    centre (kept inside it); and whether it has any mass (``N``)."""
    mass = glyph.sum((1, 2)).to(_WIDE)
    has_mass = mass > 0
    mass = torch.where(has_mass, mass, 1.0)
    com_y = (glyph.sum(2).to(_WIDE) * torch.arange(size[0], dtype=_WIDE)).sum(1) / mass
    com_x = (glyph.sum(1).to(_WIDE) * torch.arange(size[1], dtype=_WIDE)).sum(1) / mass
    top = torch.minimum(torch.round(size[0] / 2 - com_y).clamp(min=0), (size[0] - height).clamp(min=0))
    left = torch.minimum(torch.round(size[1] / 2 - com_x).clamp(min=0), (size[1] - width).clamp(min=0))
    return _shifted(_shifted(glyph, top.to(torch.int64), 1), left.to(torch.int64), 2), has_mass


def _shifted(x: torch.Tensor, offset: torch.Tensor, axis: int) -> torch.Tensor:
    """``x`` moved ``offset`` (``N``, at least 0) pixels down (axis 1) or right (axis 2), zeros coming in."""
    source = torch.arange(x.shape[axis])[None] - offset[:, None]  # N x length
    inside, source = source >= 0, source.clamp(min=0)
    if axis == 1:
        index, inside = source[:, :, None].expand_as(x), inside[:, :, None]
    else:
        index, inside = source[:, None, :].expand_as(x), inside[:, None, :]
    return torch.where(inside, x.gather(axis, index), 0.0)
