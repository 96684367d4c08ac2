"""Distance-masked decoding: the sampler never writes two atoms closer than a minimum distance.

A per-sequence constraint beside the grammar, which both backends apply to the tokens the grammar allows
(the sampled distribution is the model's, renormalised over the tokens both allow). It reads the crystal text
as it is written. Once the two lattice lines are written the cell is known (pymatgen's conventions:
``Lattice.from_parameters``, rows are the lattice vectors, Cartesian = fractional · matrix, as the codec
parses the text), and a site can only sit on the 100³ grid of two-decimal fractional positions. Every
finished site rules out the grid points closer than ``min_distance`` Å to it or to one of its periodic
images: the same set of grid offsets for every site of a cell (the stencil: the grid points inside the
ball, enumerated once per cell in an LLL-reduced basis, folded onto the grid), so marking a site touches
only its neighbourhood. A coordinate-line prefix fixes the leading digits of the position, i.e. a block of
the grid, and is allowed exactly when the block still holds a free point: counts of ruled-out points per
block (per digit prefix) answer that in O(1). Self-images count too: a cell with a lattice vector
shorter than ``min_distance`` has no position for any site.

A new site may start only while a free position is left. Unconditional text then simply ends (the
grammar's end of text is the only allowed token); when the grammar demands another site (the first one,
or the rest of a formula's multiple) and none is free, no token is allowed and the sample ends as the
typed failure ``no_room``.

Room for the formula: with a formula of n sites per formula unit the lattice lines are constrained the
same way (exact lookahead over the grammar's lengths and angle triples) so that the cell's volume is at
least n × VOLUME_PER_SITE, and an element may only be written if the grammar's site sequence it commits to
(k formula units) has room in that volume (k·n × VOLUME_PER_SITE at most the cell's volume).
VOLUME_PER_SITE is 8.88 Å³, the 0.5th percentile of volume per atom over the 1,000 MP-20 train rows in
../shared/data (8.40 over the 7,344 val rows; the smallest train value is 7.73), or the densest packing of
spheres of diameter min_distance (d³/√2) where that is larger.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from crystal_cli.errors import CrystalError
from crystal_cli.grammar import ANGLE_BUCKETS, FormulaConstraint, gamma_range

MIN_DISTANCE = 0.5  # Å, CDVAE's structural-validity cut-off
VOLUME_PER_SITE = 8.88  # Å³, see the module docstring
GRID = 100  # two decimals per fractional coordinate
POINTS = GRID**3
DIGITS = 6  # grid digits of a position: x1 x2 y1 y2 z1 z2
_DIGIT_COLUMNS = (2, 3, 7, 8, 12, 13)  # where they sit in "0.xx 0.yy 0.zz"
_DIGIT_SLOT = {column: slot for slot, column in enumerate(_DIGIT_COLUMNS)}
_TOLERANCE = 1e-6  # Å: points closer than min_distance + this are ruled out, so pymatgen never reads < d
_VOLUME_SLACK = 1e-9  # relative, the same on both sides of every volume comparison
_MAX_LENGTH = 99.9
_LENGTH_PREFIX = re.compile(r"[1-9][0-9]?(\.[0-9]?)?")
_BOX_CHUNK = 1 << 21  # grid points enumerated at once while building a stencil
_STENCIL_CACHE = 256


def check_min_distance(value: float) -> float:
    """A user's --min-distance: a finite number of Å >= 0 (0 switches the guard off)."""
    if not math.isfinite(value) or value < 0:
        raise CrystalError(f"--min-distance must be a finite distance >= 0 Å (0 switches the guard off), got {value}")
    return float(value)


@dataclass(frozen=True)
class GuardSettings:
    """What the guard enforces for one run; the backends build a DistanceGuard on their vocabulary from it."""

    min_distance: float = MIN_DISTANCE
    formula: FormulaConstraint | None = None  # the grammar's --formula: its sites must fit the cell
    volume_per_site: float | None = VOLUME_PER_SITE  # None: no volume floor

    def site_volume(self) -> float | None:
        """The volume floor per site, or None when the lattice lines are not constrained."""
        if self.formula is None or self.volume_per_site is None:
            return None
        return max(self.volume_per_site, self.min_distance**3 / math.sqrt(2))


# ------------------------------------------------------------------------------------------ geometry


def _volume_factor(ca, cb, cg):
    """V / (abc) from the angles' cosines; < 0 marks a triple that encloses no volume."""
    squared = 1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg
    return np.where(squared > 0, np.sqrt(np.maximum(squared, 0)), -1.0)


@lru_cache(maxsize=1)
def _angle_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The grammar's angle triples as γ ranges per (α, β) (index = degrees), with the largest V/(abc) a
    completion can reach after α and after (α, β)."""
    cos = np.cos(np.radians(np.arange(180)))
    lo = np.ones((180, 180), dtype=np.int64)
    hi = np.zeros((180, 180), dtype=np.int64)
    for a_bucket in ANGLE_BUCKETS:
        for b_bucket in ANGLE_BUCKETS:
            g_lo, g_hi = gamma_range(a_bucket, b_bucket)
            lo[a_bucket[0] : a_bucket[1] + 1, b_bucket[0] : b_bucket[1] + 1] = g_lo
            hi[a_bucket[0] : a_bucket[1] + 1, b_bucket[0] : b_bucket[1] + 1] = g_hi
    ca, cb = cos[:, None], cos[None, :]
    # V/(abc) squared is (1 - ca²)(1 - cb²) - (cos γ - ca cb)²: largest at the γ whose cosine is nearest ca cb
    best = np.degrees(np.arccos(np.clip(ca * cb, -1, 1)))
    reach = np.full((180, 180), -1.0)
    for gamma in (np.floor(best), np.ceil(best)):
        gamma = np.clip(gamma, lo, hi).astype(np.int64)
        reach = np.maximum(reach, _volume_factor(ca, cb, cos[gamma]))
    empty = lo > hi
    empty[0, :] = empty[:, 0] = True
    reach[empty] = -1.0
    return cos, lo, hi, reach, reach.max(axis=1)


@lru_cache(maxsize=1)
def _angle_prefixes() -> dict[str, np.ndarray]:
    """Angle values (1..179, no leading zeros) whose text starts with each prefix."""
    table: dict[str, list[int]] = {"": list(range(1, 180))}
    for value in range(1, 180):
        text = str(value)
        for i in range(1, len(text) + 1):
            table.setdefault(text[:i], []).append(value)
    return {prefix: np.array(values) for prefix, values in table.items()}


def _longest(prefix: str) -> float | None:
    """The largest grammatical length (1.0..99.9, one decimal) whose text starts with prefix."""
    if not prefix:
        return _MAX_LENGTH
    if not _LENGTH_PREFIX.fullmatch(prefix):
        return None
    whole, _, decimal = prefix.partition(".")
    if "." not in prefix:
        return float(whole + "9.9") if len(whole) == 1 else float(whole + ".9")
    return float(f"{whole}.{decimal or '9'}")


def shortest_distance(structure) -> float | None:
    """The shortest distance between two sites of a pymatgen Structure, periodic images included (its
    distance_matrix, as CDVAE's validity reads it); None for a single site."""
    if len(structure) < 2:
        return None
    return float((structure.distance_matrix + np.eye(len(structure)) * 1e9).min())


def lattice_volume(lengths: Sequence[float], angles: Sequence[int]) -> float:
    """a·b·c·V/(abc), the one volume formula both the lookahead and the room check use."""
    cos = np.cos(np.radians(np.asarray(angles, dtype=float)))
    return float(lengths[0] * lengths[1] * lengths[2] * _volume_factor(*cos))


@dataclass(frozen=True)
class Stencil:
    """The grid offsets (folded into 0..99) within min_distance of a site, for one cell."""

    volume: float
    full: bool  # a lattice vector is shorter than min_distance: no site fits at all
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray]


def stencil(lengths: Sequence[float], angles: Sequence[int], min_distance: float) -> Stencil:
    """Every grid offset δ with |δ/100 · matrix| < min_distance for some periodic image, exactly."""
    from pymatgen.core import Lattice

    lattice = Lattice.from_parameters(*lengths, *angles)
    volume = lattice_volume(lengths, angles)
    matrix = lattice.matrix
    reduced = lattice.get_lll_reduced_lattice().matrix
    mapping = np.rint(reduced @ np.linalg.inv(matrix)).astype(np.int64)  # reduced = mapping · matrix
    if abs(round(np.linalg.det(mapping))) != 1 or not np.allclose(mapping @ matrix, reduced, atol=1e-6):
        reduced, mapping = matrix, np.eye(3, dtype=np.int64)
    limit = min_distance + _TOLERANCE
    empty = (np.zeros(0, dtype=np.int64),) * 3
    if np.linalg.norm(reduced, axis=1).min() < limit:
        return Stencil(volume, True, empty)
    inverse_norms = np.linalg.norm(np.linalg.inv(reduced), axis=0)  # |k_i| <= |k · reduced| · these
    # self-images: a lattice vector shorter than the limit (k in cell units, small box: the basis is reduced)
    reach = np.floor(limit * inverse_norms).astype(np.int64)
    cells = np.stack(np.meshgrid(*(np.arange(-r, r + 1) for r in reach), indexing="ij"), -1).reshape(-1, 3)
    lengths_sq = ((cells @ reduced) ** 2).sum(axis=1)
    if np.any((lengths_sq < limit**2) & np.any(cells != 0, axis=1)):
        return Stencil(volume, True, empty)
    # grid points of the reduced basis inside the ball, mapped to the original grid and folded onto it: per
    # (k_x, k_y) the k_z inside are an interval (a quadratic), at most GRID of them distinct once folded
    # (a row of the unimodular mapping is a primitive vector, of order GRID on the folded grid)
    step = reduced / GRID
    reach = np.floor(GRID * limit * inverse_norms).astype(np.int64)
    kx, ky = np.meshgrid(np.arange(-reach[0], reach[0] + 1), np.arange(-reach[1], reach[1] + 1), indexing="ij")
    kx, ky = kx.ravel(), ky.ravel()
    u = kx[:, None] * step[0] + ky[:, None] * step[1]
    a = step[2] @ step[2]
    b = u @ step[2]
    root = np.sqrt(np.maximum(b * b - a * ((u * u).sum(axis=1) - limit**2), 0.0))
    lo = np.floor((-b - root) / a).astype(np.int64) + 1
    hi = np.ceil((-b + root) / a).astype(np.int64) - 1
    count = np.clip(hi - lo + 1, 0, GRID)
    hit = np.zeros(POINTS, dtype=bool)
    per_chunk = max(1, _BOX_CHUNK // GRID)
    for first in range(0, len(count), per_chunk):
        rows = slice(first, first + per_chunk)
        n = count[rows]
        line = np.repeat(np.arange(len(n)), n)  # which (k_x, k_y) each point belongs to
        starts = np.cumsum(n) - n
        kz = lo[rows][line] + np.arange(int(n.sum())) - starts[line]
        k = np.stack([kx[rows][line], ky[rows][line], kz], axis=1)
        folded = (k @ mapping) % GRID
        hit[(folded[:, 0] * GRID + folded[:, 1]) * GRID + folded[:, 2]] = True
    flat = np.flatnonzero(hit)
    return Stencil(volume, False, (flat // (GRID * GRID), (flat // GRID) % GRID, flat % GRID))


class _Occupancy:
    """Grid points ruled out by the finished sites of one sequence, with counts per digit-prefix block."""

    def __init__(self, cell: Stencil):
        self.cell = cell
        self.taken = np.zeros(POINTS, dtype=bool)
        self.counts = [np.zeros(10**m, dtype=np.int64) for m in range(DIGITS)]  # counts[0] is the total

    def near(self, position: int) -> np.ndarray:
        """Flat indices of the grid points closer than min_distance to a site at `position`."""
        x, y, z = position // (GRID * GRID), (position // GRID) % GRID, position % GRID
        ox, oy, oz = self.cell.offsets
        return (((ox + x) % GRID) * GRID + (oy + y) % GRID) * GRID + (oz + z) % GRID

    def add(self, position: int) -> None:
        near = self.near(position)
        new = near[~self.taken[near]]
        self.taken[new] = True
        self.counts[0][0] += len(new)
        for m in range(1, DIGITS):
            self.counts[m] += np.bincount(new // 10 ** (DIGITS - m), minlength=10**m)

    def free(self, code: int, digits: int, pending: Sequence[int] = ()) -> bool:
        """Does the block of positions starting with `digits` digits `code` hold a point not ruled out
        (also not by `pending`, sites finished inside the token being checked)?"""
        size = 10 ** (DIGITS - digits)
        taken = int(self.taken[code]) if digits == DIGITS else int(self.counts[digits][code])
        if pending and taken + len(pending) * len(self.cell.offsets[0]) >= size:
            near = np.unique(np.concatenate([self.near(p) for p in pending]))
            new = near[~self.taken[near]]
            taken += int(np.count_nonzero(new // size == code))
        return taken < size


# ------------------------------------------------------------------------------------------ the guard


class DistanceGuard:
    """GuardSettings on one vocabulary (the text of every token), with the stencils of recent cells."""

    def __init__(self, settings: GuardSettings, pieces: Sequence[str]):
        if not settings.min_distance > 0:
            raise ValueError("a DistanceGuard needs min_distance > 0 (0 means: no guard)")
        self.settings = settings
        self.pieces = pieces
        site_volume = settings.site_volume()
        formula = settings.formula
        self.unit_volume = None if site_volume is None else site_volume * sum(formula.counts)
        # the grammar's site sequence for k formula units, k = 1..max_multiple
        self.sequences = [] if formula is None else [
            tuple(el for el, n in zip(formula.elements, formula.counts) for _ in range(k * n))
            for k in range(1, formula.max_multiple + 1)
        ]
        self._stencils: dict[tuple, Stencil] = {}

    def new_state(self) -> GuardState:
        return GuardState(self)

    def stencil(self, lengths: tuple[float, ...], angles: tuple[int, ...]) -> Stencil:
        key = (lengths, angles)
        cell = self._stencils.get(key)
        if cell is None:
            if len(self._stencils) >= _STENCIL_CACHE:
                self._stencils.clear()
            cell = self._stencils[key] = stencil(lengths, angles, self.settings.min_distance)
        return cell

    def fits(self, volume: float, elements: tuple[str, ...], more: int, symbol: str = "") -> bool:
        """Is there a formula multiple k with room in `volume` whose site sequence starts with `elements`
        and has `more` sites after them, the first of those starting with `symbol`?"""
        if self.unit_volume is None:
            return True
        units = math.floor(volume * (1 + _VOLUME_SLACK) / self.unit_volume)
        done = len(elements)
        return any(
            len(sites) >= done + more and sites[:done] == elements and (not more or sites[done].startswith(symbol))
            for sites in self.sequences[:units]
        )

    def lattice_room(self, lengths: list[float], line: str) -> bool:
        """Can the lattice text so far (`lengths`: the finished lengths line, if any; `line`: the line
        being written) still reach the volume floor with some grammatical completion?"""
        target = self.unit_volume * (1 - _VOLUME_SLACK)
        cos, lo, hi, reach_ab, reach_a = _angle_tables()
        if len(lengths) < 3:  # on the lengths line; the best angles reach V/(abc) = 1 (90 90 90)
            parts = line.split(" ")
            if len(lengths) + len(parts) > 3:
                return False
            longest = [_longest(p) for p in parts]
            if any(v is None for v in longest):
                return False
            return math.prod(longest) * _MAX_LENGTH ** (3 - len(parts)) * float(reach_a.max()) >= target
        parts = line.split(" ")
        prefixes = _angle_prefixes()
        if len(parts) > 3 or any(p not in prefixes for p in parts):
            return False
        done = [int(p) for p in parts[:-1]]
        values = prefixes[parts[-1]]
        if len(done) == 0:
            best = reach_a[values].max()
        elif len(done) == 1:
            best = reach_ab[done[0], values].max()
        else:
            alpha, beta = done
            values = values[(values >= lo[alpha, beta]) & (values <= hi[alpha, beta])]
            if not len(values):
                return False
            best = _volume_factor(cos[alpha], cos[beta], cos[values]).max()
        return best > 0 and math.prod(lengths) * float(best) >= target


class GuardState:
    """One sequence: the text so far, line by line, and the grid points its finished sites rule out."""

    def __init__(self, guard: DistanceGuard):
        self.guard = guard
        self.line_no = 0  # 0 lengths, 1 angles, then element (even) and coordinate (odd) lines
        self.line = ""
        self.lengths: list[float] = []
        self.elements: tuple[str, ...] = ()  # finished element lines
        self.cell: Stencil | None = None
        self.occupancy: _Occupancy | None = None
        self.masked = 0  # tokens the grammar allowed and the guard did not, summed over the steps

    @property
    def checking(self) -> bool:
        """Could the guard reject a token now? (On element lines only under a formula's volume floor.)"""
        if self.line_no == 0 or self.line_no % 2 == 0:
            return self.guard.unit_volume is not None
        return True

    def accept(self, piece: str) -> None:
        """The token's text was appended to the sequence."""
        for ch in piece:
            if ch != "\n":
                self.line += ch
                continue
            if self.line_no == 0:
                self.lengths = [float(v) for v in self.line.split()]
            elif self.line_no == 1:
                self.cell = self.guard.stencil(tuple(self.lengths), tuple(int(v) for v in self.line.split()))
                if not self.cell.full:
                    self.occupancy = _Occupancy(self.cell)
            elif self.line_no % 2 == 1:
                self.occupancy.add(_position(self.line))
            else:
                self.elements += (self.line,)
            self.line_no += 1
            self.line = ""

    def allowed(self, ids: np.ndarray) -> np.ndarray:
        """Which of these (grammar-allowed) tokens leave a text with a far-enough completion; the rejected
        ones are added to `masked`."""
        pieces = self.guard.pieces
        keep = np.fromiter((self._feasible(pieces[int(t)]) for t in ids), dtype=bool, count=len(ids))
        self.masked += len(keep) - int(keep.sum())
        return keep

    def _feasible(self, piece: str) -> bool:
        """Would the text extended by `piece` still have a completion that keeps every distance?"""
        if len(piece) == 1 and piece != "\n" and self.line_no % 2 == 1 and self.line_no > 1 and self.occupancy:
            slot = _DIGIT_SLOT.get(len(self.line))  # the common step: one character of a coordinate line
            if slot is None:  # a literal ("0", ".", " "): the position's digits so far, allowed, are unchanged
                return True
            digits = "".join(self.line[i] for i in _DIGIT_COLUMNS[:slot]) + piece
            return digits.isdigit() and self.occupancy.free(int(digits), slot + 1)
        line_no, line, lengths, elements = self.line_no, self.line, self.lengths, self.elements
        cell, occupancy = self.cell, self.occupancy
        pending: list[int] = []  # sites the piece itself finishes
        for ch in piece:
            if ch != "\n":
                line += ch
                continue
            if line_no == 0:
                lengths = [float(v) for v in line.split()]
            elif line_no == 1:
                cell, occupancy = self.guard.stencil(tuple(lengths), tuple(int(v) for v in line.split())), None
            elif line_no % 2 == 1:
                occupancy = occupancy or _Occupancy(cell)
                pending.append(_position(line))
            else:
                elements += (line,)
                if not self.guard.fits(cell.volume, elements, 0):
                    return False
            line_no += 1
            line = ""
            if line_no % 2 == 0 and not self._room(cell, elements, occupancy, pending):
                return False
        if line_no <= 1:
            if self.guard.unit_volume is None:
                return True
            return self.guard.lattice_room(lengths, line)
        if line_no % 2 == 0:
            return self.guard.fits(cell.volume, elements, 1, line)
        if occupancy is None:  # the piece finished the lattice: nothing taken yet
            return True
        digits = "".join(line[i] for i in _DIGIT_COLUMNS if i < len(line))
        return occupancy.free(int(digits) if digits else 0, len(digits), pending)

    def _room(self, cell: Stencil, elements: tuple[str, ...], occupancy: _Occupancy | None,
              pending: list[int]) -> bool:
        """May another site start: a free position left, and a formula multiple with room for it?"""
        if cell.full or not self.guard.fits(cell.volume, elements, 1):
            return False
        return occupancy is None or occupancy.free(0, 0, pending)


def _position(line: str) -> int:
    """The flat grid index (x·100² + y·100 + z, in hundredths) of a finished coordinate line."""
    return int("".join(line[i] for i in _DIGIT_COLUMNS))

