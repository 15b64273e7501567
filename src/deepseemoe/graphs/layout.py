"""Force-directed layout for large sparse graphs (ForceAtlas2's forces, vectorised, O(N + M + G² log G)
per iteration), so that a graph of millions of edges is laid out on a laptop's cores in minutes.

Forces on node u (ForceAtlas2, Jacomy et al. 2014; masses m_u = degree + 1):
- attraction along each edge (u, v): −w_uv · (x_u − x_v)             (linear in distance)
- repulsion between all pairs:      k_r · m_u m_v · (x_u − x_v) / d²  (magnitude k_r m_u m_v / d)
- gravity:                           −k_g · m_u · x_u / |x_u|
The all-pairs repulsion is where the cost is. ForceAtlas2 approximates it with a Barnes–Hut tree;
here it is a particle-mesh sum instead: masses are spread on a G×G grid (cloud-in-cell), the grid
is convolved by FFT with the repulsion kernel r/|r|², and each node reads the field back at its
position. Pairs closer than a cell get a smoothed force (the kernel is softened at one cell), the
usual trade of particle-mesh codes; the layout cares about structure at the scale of many cells.
Speeds follow ForceAtlas2's adaptive scheme: a global speed from the ratio of traction to swing
(how much each node's force keeps its direction), and a per-node speed that slows swinging nodes.

Shapes: positions [N, 2]; edges [M, 2] int (undirected, each once); weights [M].
"""

from __future__ import annotations

import functools

import numpy as np


def _deposit(pos: np.ndarray, mass: np.ndarray, lo: np.ndarray, cell: float, g: int) -> tuple[np.ndarray, ...]:
    """Cloud-in-cell: each node's mass split over the 4 grid points around it. Returns the grid and the
    (indices, weights) needed to read a field back at the nodes."""
    f = (pos - lo) / cell - 0.5
    i0 = np.clip(np.floor(f).astype(np.int64), 0, g - 2)
    t = np.clip(f - i0, 0.0, 1.0)
    grid = np.zeros(g * g)
    corners = []
    for dx, wx in ((0, 1 - t[:, 0]), (1, t[:, 0])):
        for dy, wy in ((0, 1 - t[:, 1]), (1, t[:, 1])):
            idx = (i0[:, 0] + dx) * g + (i0[:, 1] + dy)
            w = wx * wy
            grid += np.bincount(idx, weights=mass * w, minlength=g * g)
            corners.append((idx, w))
    return grid.reshape(g, g), corners


@functools.lru_cache(maxsize=4)
def _kernel_ffts(g: int) -> tuple[np.ndarray, np.ndarray]:
    """FFTs of the repulsion kernel's x and y components, in units of one cell, on a zero-padded
    2G×2G grid (no wrap-around). At cell size c the kernel is these / c: (k·c) / (c²(|k|² + 1))."""
    n = 2 * g
    k = np.fft.fftfreq(n, d=1.0 / n)  # offsets 0, 1, …, −1 in cells, in FFT order
    dx, dy = np.meshgrid(k, k, indexing="ij")
    r2 = dx * dx + dy * dy + 1.0  # softened at one cell
    return np.fft.rfft2(dx / r2), np.fft.rfft2(dy / r2)


def repulsion_field(pos: np.ndarray, mass: np.ndarray, grid: int = 256) -> np.ndarray:
    """Σ_v m_v (x_u − x_v) / |x_u − x_v|² at every node u [N, 2], by particle-mesh (module docstring);
    the node's own mass is included but contributes ~0 (the kernel is odd)."""
    g = int(grid)
    lo = pos.min(0)
    cell = float((pos.max(0) - lo).max()) * 1.0001 / (g - 1) + 1e-12
    lo = lo - cell / 2
    masses, corners = _deposit(pos, mass, lo, cell, g)
    kx, ky = _kernel_ffts(g)
    rho = np.fft.rfft2(masses, s=(2 * g, 2 * g)) / cell
    fx = np.fft.irfft2(rho * kx, s=(2 * g, 2 * g))[:g, :g].ravel()
    fy = np.fft.irfft2(rho * ky, s=(2 * g, 2 * g))[:g, :g].ravel()
    out = np.zeros_like(pos)
    for idx, cw in corners:
        out[:, 0] += fx[idx] * cw
        out[:, 1] += fy[idx] * cw
    return out


def forceatlas2(n: int, edges: np.ndarray, weights: np.ndarray | None = None, *, iterations: int = 100,
                seed: int = 0, repulsion: float = 1.0, gravity: float = 1.0, grid: int = 256,
                tolerance: float = 1.0, initial: np.ndarray | None = None) -> np.ndarray:
    """Positions [N, 2] of a graph of `n` nodes and `edges` [M, 2] (module docstring)."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    w = np.ones(len(edges)) if weights is None else np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    pos = rng.standard_normal((n, 2)) * np.sqrt(n) if initial is None else np.array(initial, dtype=np.float64)
    mass = 1.0 + np.bincount(edges.ravel(), minlength=n).astype(np.float64)
    src, dst = edges[:, 0], edges[:, 1]
    previous = np.zeros_like(pos)
    speed, efficiency = 1.0, 1.0
    g = int(grid)
    for _ in range(iterations):
        force = repulsion_field(pos, mass, g)
        cell = float((pos.max(0) - pos.min(0)).max()) * 1.0001 / (g - 1) + 1e-12
        force *= repulsion * mass[:, None]
        # attraction along edges
        delta = (pos[src] - pos[dst]) * w[:, None]
        for d in range(2):
            force[:, d] -= np.bincount(src, weights=delta[:, d], minlength=n)
            force[:, d] += np.bincount(dst, weights=delta[:, d], minlength=n)
        # gravity toward the centre
        norm = np.linalg.norm(pos, axis=1, keepdims=True)
        force -= gravity * mass[:, None] * pos / np.maximum(norm, 1e-9)
        # ForceAtlas2's adaptive speeds: swing = how much a node's force turned, traction = how much it kept
        swing = mass * np.linalg.norm(force - previous, axis=1)
        traction = mass * np.linalg.norm(force + previous, axis=1) / 2
        total_swing, total_traction = float(swing.sum()), float(traction.sum())
        optimal = 0.05 * np.sqrt(n)
        jitter = tolerance * max(np.sqrt(optimal), min(10.0, optimal * total_traction / max(n * n, 1)))
        if total_traction > 0 and total_swing / total_traction > 2.0:
            efficiency = max(efficiency * 0.5, 0.05)
            jitter = max(jitter, tolerance)
        target = jitter * efficiency * total_traction / total_swing if total_swing > 0 else speed
        if total_swing > jitter * total_traction:
            efficiency = max(efficiency * 0.7, 0.05)
        elif speed < 1000:
            efficiency *= 1.3
        speed += min(target - speed, 0.5 * speed)
        node_speed = speed / (1.0 + np.sqrt(speed * swing))
        # a node moves at most 10 cells per step (ForceAtlas2's bound on the displacement)
        step = node_speed[:, None] * force
        length = np.linalg.norm(step, axis=1, keepdims=True)
        step *= np.minimum(1.0, 10 * cell / np.maximum(length, 1e-12))
        pos += step
        previous = force
    return pos
