"""Placing cores on a mesh of chips and counting the links of XY multicast trees.

Coordinates: chips sit in a ``chips_x x chips_y`` grid; a core's *global* position is
``gx = chip_col * mesh_cols + x``, ``gy = chip_row * mesh_rows + y``. A link between two
neighbouring positions that lie on different chips is a chip-to-chip link.

Routing is dimension-order (XY): a packet first travels along its source's row to the
destination column, then along that column. A multicast packet follows the union of the XY
paths to its destinations (the tree forks where paths part), so each destination receives it
once and each link of the tree carries it once. For XY routing the tree's size has a closed
form: the span of the source row covering the source and every destination column, plus, per
destination column, the span covering the source row and that column's destinations.

Placement (documented method):

1. *Layer-ordered fill*: cores are numbered in data-flow order (block by block; in a block
   att.key, att.value, att.receptance, att.output, ffn.receptance, ffn.key, ffn.value; the head
   last; tiles of a matrix row-block by row-block) and laid along a space-filling curve, a Hilbert
   curve inside each chip when the mesh is a power-of-two square (consecutive cores stay in
   compact 2-D patches, so a layer's producers sit next to its consumers), a serpentine otherwise;
   chips are visited in serpentine order of the chip grid.
2. *Local improvement*: random pairwise swaps of two cores of the same layer, kept when they
   lower the hop-weighted traffic (expected flits per token x (on-chip links x E_hop + chip links
   x E_chip) over every multicast tree, partial-sum and dense-transfer route that touches the two
   cores); greedy, a fixed number of proposals per core, reproducible by seed.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


# ----------------------------------------------------------------------------- the fill order
def _hilbert_d2xy(n: int, d: int) -> tuple[int, int]:
    """Position of step ``d`` on the Hilbert curve filling an ``n x n`` square (n a power of two)."""
    x = y = 0
    s, t = 1, d
    while s < n:
        rx = 1 & (t // 2)
        ry = 1 & (t ^ rx)
        if ry == 0:
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        x += s * rx
        y += s * ry
        t //= 4
        s *= 2
    return x, y


def chip_curve(rows: int, cols: int) -> np.ndarray:
    """Fill order of one chip's cores: ``[rows*cols, 2]`` of (x, y)."""
    if rows == cols and rows & (rows - 1) == 0:
        return np.array([_hilbert_d2xy(rows, d) for d in range(rows * cols)], dtype=np.int64)
    order = [(x if y % 2 == 0 else cols - 1 - x, y) for y in range(rows) for x in range(cols)]
    return np.array(order, dtype=np.int64)


def chip_grid(n_chips: int) -> tuple[int, int]:
    """(chips_x, chips_y): the near-square grid the chips are arranged in."""
    cx = max(1, math.ceil(math.sqrt(n_chips)))
    return cx, max(1, math.ceil(n_chips / cx))


def initial_positions(n_cores: int, mesh_rows: int, mesh_cols: int, n_chips: int) -> tuple[np.ndarray, np.ndarray]:
    """Global (gx, gy) of cores ``0..n_cores-1`` along the layer-ordered fill."""
    curve = chip_curve(mesh_rows, mesh_cols)
    cx, _ = chip_grid(n_chips)
    gx = np.empty(n_cores, dtype=np.int64)
    gy = np.empty(n_cores, dtype=np.int64)
    per = mesh_rows * mesh_cols
    for chip in range(-(-n_cores // per)):
        row, col = divmod(chip, cx)
        if row % 2 == 1:  # serpentine over the chip grid; mirror the curve to keep it running the same way
            col = cx - 1 - col
        lo, hi = chip * per, min(n_cores, (chip + 1) * per)
        xy = curve[: hi - lo]
        x = xy[:, 0] if row % 2 == 0 else mesh_cols - 1 - xy[:, 0]
        gx[lo:hi] = col * mesh_cols + x
        gy[lo:hi] = row * mesh_rows + xy[:, 1]
    return gx, gy


def chip_coords(gx: np.ndarray, gy: np.ndarray, mesh_rows: int, mesh_cols: int, chips_x: int):
    """(chip, x, y) of global positions."""
    return (gy // mesh_rows) * chips_x + gx // mesh_cols, gx % mesh_cols, gy % mesh_rows


# ------------------------------------------------------------------------------ tree kernels
@njit(cache=True)
def _crossings(a, b, period):
    lo, hi = min(a, b), max(a, b)
    return hi // period - lo // period


@njit(cache=True)
def tree_stats(gx, gy, src, dests, mesh_w, mesh_h, seen, lo_y, hi_y, cols, stamp):
    """XY multicast tree from core ``src`` to cores ``dests`` (positions ``gx, gy``).

    Returns (links, chip_links, max_hops, max_chip_hops): links of the tree, those that cross a
    chip boundary, and the longest source-destination path in hops and in chip crossings.
    ``seen, lo_y, hi_y, cols``: scratch arrays as wide as the global mesh; ``stamp`` must differ
    from every value already in ``seen`` (callers pass a counter).
    """
    sx, sy = gx[src], gy[src]
    xmin, xmax = sx, sx
    ncols = 0
    max_h, max_c = 0, 0
    for i in range(dests.shape[0]):
        d = dests[i]
        x, y = gx[d], gy[d]
        xmin = min(xmin, x)
        xmax = max(xmax, x)
        if seen[x] != stamp:
            seen[x] = stamp
            lo_y[x] = min(sy, y)
            hi_y[x] = max(sy, y)
            cols[ncols] = x
            ncols += 1
        else:
            lo_y[x] = min(lo_y[x], y)
            hi_y[x] = max(hi_y[x], y)
        max_h = max(max_h, abs(x - sx) + abs(y - sy))
        max_c = max(max_c, _crossings(sx, x, mesh_w) + _crossings(sy, y, mesh_h))
    links = xmax - xmin
    chip = xmax // mesh_w - xmin // mesh_w
    for k in range(ncols):
        x = cols[k]
        links += hi_y[x] - lo_y[x]
        chip += hi_y[x] // mesh_h - lo_y[x] // mesh_h
    return links, chip, max_h, max_c


@njit(cache=True)
def route_stats(gx, gy, src, ptr, dst, mesh_w, mesh_h, width):
    """``tree_stats`` of every route (sources ``src``, destinations ``dst[ptr[r]:ptr[r+1]]``)."""
    n = src.shape[0]
    out = np.zeros((n, 4), dtype=np.int64)
    seen = np.full(width, -1, dtype=np.int64)
    lo_y = np.zeros(width, dtype=np.int64)
    hi_y = np.zeros(width, dtype=np.int64)
    cols = np.zeros(width, dtype=np.int64)
    for r in range(n):
        a, b, c, d = tree_stats(gx, gy, src[r], dst[ptr[r]:ptr[r + 1]], mesh_w, mesh_h, seen, lo_y, hi_y, cols, r)
        out[r, 0], out[r, 1], out[r, 2], out[r, 3] = a, b, c, d
    return out


def route_stats_numpy(gx, gy, src, ptr, dst, mesh_w, mesh_h):
    """Plain-numpy twin of :func:`route_stats` (one route at a time), for tests."""
    out = np.zeros((len(src), 4), dtype=np.int64)
    for r in range(len(src)):
        d = dst[ptr[r]:ptr[r + 1]]
        sx, sy, dx, dy = gx[src[r]], gy[src[r]], gx[d], gy[d]
        xmin, xmax = min(sx, dx.min(initial=sx)), max(sx, dx.max(initial=sx))
        links = xmax - xmin
        chip = xmax // mesh_w - xmin // mesh_w
        for x in np.unique(dx):
            ys = dy[dx == x]
            lo, hi = min(sy, ys.min()), max(sy, ys.max())
            links += hi - lo
            chip += hi // mesh_h - lo // mesh_h
        hops = np.abs(dx - sx) + np.abs(dy - sy)
        cross = (np.abs(np.maximum(dx, sx) // mesh_w - np.minimum(dx, sx) // mesh_w)
                 + np.abs(np.maximum(dy, sy) // mesh_h - np.minimum(dy, sy) // mesh_h))
        out[r] = links, chip, hops.max(initial=0), cross.max(initial=0)
    return out


def xy_tree_links(src: tuple[int, int], dests) -> set[tuple[tuple[int, int], tuple[int, int]]]:
    """The directed links ``((x, y), (x', y'))`` of the XY multicast tree, enumerated hop by hop
    (for the functional and network simulators, and to check the closed form)."""
    links = set()
    sx, sy = src
    for dx, dy in dests:
        x, y = sx, sy
        while x != dx:
            nx = x + (1 if dx > x else -1)
            links.add(((x, y), (nx, y)))
            x = nx
        while y != dy:
            ny = y + (1 if dy > y else -1)
            links.add(((x, y), (x, ny)))
            y = ny
    return links


# ----------------------------------------------------------------------- local improvement
@njit(cache=True)
def _routes_cost(gx, gy, rs, n_rs, r_src, r_ptr, r_dst, w_link, w_chip, mesh_w, mesh_h, seen, lo_y, hi_y, cols,
                 stamp):
    total = 0.0
    for i in range(n_rs):
        r = rs[i]
        links, chip, _, _ = tree_stats(gx, gy, r_src[r], r_dst[r_ptr[r]:r_ptr[r + 1]], mesh_w, mesh_h,
                                       seen, lo_y, hi_y, cols, stamp + i)
        total += w_link[r] * links + w_chip[r] * chip
    return total


@njit(cache=True)
def improve_swaps(gx, gy, r_src, r_ptr, r_dst, w_link, w_chip, c_ptr, c_routes, group_ptr, group_cores,
                  core_group, n_proposals, seed, mesh_w, mesh_h, width):
    """Greedy pairwise swaps of cores of the same group (positions ``gx, gy`` updated in place).

    A swap is kept when the weighted cost of the routes touching either core falls. Returns
    (accepted swaps, total cost decrease).
    """
    np.random.seed(seed)
    n_cores = gx.shape[0]
    seen = np.full(width, -1, dtype=np.int64)
    lo_y = np.zeros(width, dtype=np.int64)
    hi_y = np.zeros(width, dtype=np.int64)
    cols = np.zeros(width, dtype=np.int64)
    mark = np.full(r_src.shape[0], -1, dtype=np.int64)
    rs = np.empty(r_src.shape[0], dtype=np.int64)
    stamp = 0
    accepted = 0
    gain = 0.0
    for it in range(n_proposals):
        a = np.random.randint(n_cores)
        g = core_group[a]
        size = group_ptr[g + 1] - group_ptr[g]
        if size < 2:
            continue
        b = group_cores[group_ptr[g] + np.random.randint(size)]
        if a == b:
            continue
        n_rs = 0
        for c in (a, b):
            for k in range(c_ptr[c], c_ptr[c + 1]):
                r = c_routes[k]
                if mark[r] != it:
                    mark[r] = it
                    rs[n_rs] = r
                    n_rs += 1
        before = _routes_cost(gx, gy, rs, n_rs, r_src, r_ptr, r_dst, w_link, w_chip, mesh_w, mesh_h,
                              seen, lo_y, hi_y, cols, stamp)
        stamp += n_rs
        gx[a], gx[b] = gx[b], gx[a]
        gy[a], gy[b] = gy[b], gy[a]
        after = _routes_cost(gx, gy, rs, n_rs, r_src, r_ptr, r_dst, w_link, w_chip, mesh_w, mesh_h,
                             seen, lo_y, hi_y, cols, stamp)
        stamp += n_rs
        if after < before - 1e-9:
            accepted += 1
            gain += before - after
        else:
            gx[a], gx[b] = gx[b], gx[a]
            gy[a], gy[b] = gy[b], gy[a]
    return accepted, gain


def csr(keys: np.ndarray, n: int, values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Group ``values`` (default: positions) by integer ``keys`` in ``[0, n)``: (ptr [n+1], grouped values)."""
    keys = np.asarray(keys, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n), out=ptr[1:])
    vals = order if values is None else np.asarray(values, dtype=np.int64)[order]
    return ptr, vals.astype(np.int64)


def improve_placement(gx, gy, route_src, route_ptr, route_dst, w_link, w_chip, core_group, *, mesh_w, mesh_h,
                      proposals_per_core: int = 8, seed: int = 0) -> tuple[int, float, float]:
    """Run :func:`improve_swaps` on copies-in-place of ``gx, gy``; returns (accepted, cost before, after)."""
    n_cores = len(gx)
    # core -> routes it is a source or destination of
    owners = np.concatenate([route_src, route_dst])
    rids = np.concatenate([np.arange(len(route_src)), np.repeat(np.arange(len(route_src)), np.diff(route_ptr))])
    c_ptr, c_routes = csr(owners, n_cores, rids)
    n_groups = int(core_group.max()) + 1 if n_cores else 0
    group_ptr, group_cores = csr(core_group, n_groups)
    width = int(max(gx.max(), gy.max())) + 2 if n_cores else 1
    stats = route_stats(gx, gy, route_src, route_ptr, route_dst, mesh_w, mesh_h, width)
    before = float(w_link @ stats[:, 0] + w_chip @ stats[:, 1])
    accepted, _ = improve_swaps(gx, gy, route_src, route_ptr, route_dst, w_link, w_chip, c_ptr, c_routes,
                                group_ptr, group_cores, np.asarray(core_group, dtype=np.int64),
                                proposals_per_core * n_cores, seed, mesh_w, mesh_h, width)
    stats = route_stats(gx, gy, route_src, route_ptr, route_dst, mesh_w, mesh_h, width)
    after = float(w_link @ stats[:, 0] + w_chip @ stats[:, 1])
    return int(accepted), before, after
