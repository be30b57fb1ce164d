"""Synthetic whole-body anatomy and its tracer uptake, built in millimetres.

Frames: anatomy is built in a body frame in mm (x towards the patient's left, y anterior, z
superior), the midline at x = 0 and the skull vertex near z = 945 mm. A grid lays voxels over that
frame (i -> x, j -> y, k -> z, head at high k), so every grid shows the same anatomy, each at its own
sampling. World coordinates (the NIfTI affine, ``centre_mm``) are RAS+, where +x is the patient's
right: the affine negates x, so arrays are stored left-to-right along i (LAS storage, as many
scanners export). Shapes are smooth superquadrics evaluated inside their bounding boxes.

Organ positions and sizes come from a 170 cm reference adult and are scaled per case (stature,
girth, fat) and jittered; uptake per organ is drawn per case within the ranges of
shared/reference/pet.md section 2 (values marked est. there are estimates, so are ours).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from segany_pet.pet.organs import ORGAN_LABELS, ORGAN_NAMES

# ----------------------------------------------------------------------------------------------
# Grids

GRID_SPECS: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    "4mm": ((128, 128, 240), (4.0, 4.0, 4.0)),
    "autopet": ((400, 400, 326), (2.036, 2.036, 3.0)),
}
# Both grids are centred here, so the ~960 mm field of view runs from the upper thighs to just
# above the skull vertex.
FOV_CENTRE_MM = np.array([0.0, 0.0, 480.0])


@dataclass(frozen=True)
class Grid:
    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @classmethod
    def named(cls, name: str) -> Grid:
        if name not in GRID_SPECS:
            raise ValueError(f"unknown phantom grid {name!r}; choose one of {sorted(GRID_SPECS)}")
        shape, spacing = GRID_SPECS[name]
        return cls(name, shape, spacing)

    @property
    def origin(self) -> np.ndarray:
        """Body-frame mm of voxel (0, 0, 0)."""
        return FOV_CENTRE_MM - (np.array(self.shape) - 1) / 2.0 * np.array(self.spacing)

    @property
    def affine(self) -> np.ndarray:
        """Voxel index -> world RAS+ mm; x is negated because the body frame's +x is the patient's left."""
        affine = np.diag([-self.spacing[0], self.spacing[1], self.spacing[2], 1.0])
        affine[:3, 3] = self.origin * np.array([-1.0, 1.0, 1.0])
        return affine

    def to_world(self, ijk) -> np.ndarray:
        """World RAS+ mm of voxel indices (what the affine gives)."""
        return np.asarray(ijk, dtype=float) @ self.affine[:3, :3].T + self.affine[:3, 3]

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def to_voxel(self, mm) -> np.ndarray:
        return (np.asarray(mm, dtype=float) - self.origin) / np.array(self.spacing)

    def box(self, lo_mm, hi_mm) -> tuple[slice, slice, slice] | None:
        """Voxel slices whose centres lie within [lo_mm, hi_mm]; None when outside the grid."""
        lo = np.ceil(self.to_voxel(lo_mm) - 1e-9).astype(int)
        hi = np.floor(self.to_voxel(hi_mm) + 1e-9).astype(int) + 1
        lo = np.clip(lo, 0, self.shape)
        hi = np.clip(hi, 0, self.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))

    def mesh(self, box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable body-frame mm coordinates (x[:,1,1], y[1,:,1], z[1,1,:]) of a box."""
        axes = [self.origin[a] + np.arange(box[a].start, box[a].stop) * self.spacing[a] for a in range(3)]
        return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


# ----------------------------------------------------------------------------------------------
# Shape primitives


class SmoothField:
    """A random smooth function of position in mm (a sum of plane waves), identical on every grid.

    Values have zero mean and unit variance over space; ``wavelength_mm`` sets the feature size.
    """

    def __init__(self, rng: np.random.Generator, wavelength_mm: float, n_waves: int = 8):
        directions = rng.normal(size=(n_waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavenumber = 2 * np.pi / (wavelength_mm * rng.uniform(0.75, 1.35, n_waves))
        self.k = directions * wavenumber[:, None]
        self.phase = rng.uniform(0, 2 * np.pi, n_waves)
        self.scale = np.sqrt(2.0 / n_waves)

    def __call__(self, dx, dy, dz) -> np.ndarray:
        total = 0.0
        for (kx, ky, kz), phase in zip(self.k, self.phase, strict=True):
            total = total + np.cos(kx * dx + ky * dy + kz * dz + phase)
        return total * self.scale


def rotation(z_deg: float = 0.0, y_deg: float = 0.0, x_deg: float = 0.0) -> np.ndarray:
    """Body-from-shape rotation, applied about x first, then y, then z."""
    a, b, c = np.radians([z_deg, y_deg, x_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


def frame_along(direction) -> np.ndarray:
    """A rotation whose first shape axis points along ``direction`` (for long organs)."""
    d = np.asarray(direction, dtype=float)
    d /= np.linalg.norm(d)
    helper = np.array([0.0, 0.0, 1.0]) if abs(d[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e2 = np.cross(helper, d)
    e2 /= np.linalg.norm(e2)
    return np.stack([d, e2, np.cross(d, e2)], axis=1)


@dataclass
class Ellipsoid:
    """A superquadric ellipsoid in body mm; ``rho`` < 1 inside, 1 on the surface."""

    centre: np.ndarray
    axes: np.ndarray
    power: float = 2.0
    rot: np.ndarray | None = None
    wobble: float = 0.0  # relative surface bumpiness
    bumps: SmoothField | None = None

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        if self.rot is None:
            reach = np.asarray(self.axes, dtype=float)
        else:  # a rotated superquadric's corners reach out to 3^(1/2 - 1/p) of the longest axis
            reach = np.full(3, np.max(self.axes) * 3.0 ** max(0.5 - 1.0 / self.power, 0.0))
        # The bumps field is bounded by sqrt(2 * waves) ~ 3.5 standard deviations.
        return self.centre - reach / (1.0 - 3.5 * self.wobble), self.centre + reach / (1.0 - 3.5 * self.wobble)

    def rho(self, grid: Grid, box=None) -> tuple[tuple[slice, slice, slice] | None, np.ndarray | None]:
        """Normalised radius over ``box`` (default: the shape's own bounding box)."""
        box = grid.box(*self.bbox()) if box is None else box
        if box is None:
            return None, None
        x, y, z = grid.mesh(box)
        d = (x - self.centre[0], y - self.centre[1], z - self.centre[2])
        if self.rot is None:
            local = d
        else:  # shape coordinates = R^T d
            r = self.rot
            local = tuple(r[0, n] * d[0] + r[1, n] * d[1] + r[2, n] * d[2] for n in range(3))
        p = self.power
        if p == 2.0:
            value = np.sqrt(sum((c / a) ** 2 for c, a in zip(local, self.axes, strict=True)))
        else:
            value = sum(np.abs(c / a) ** p for c, a in zip(local, self.axes, strict=True)) ** (1.0 / p)
        value = np.broadcast_to(value, tuple(s.stop - s.start for s in box))
        if self.wobble and self.bumps is not None:
            value = value * (1.0 + self.wobble * self.bumps(*d))
        return box, value

    def mask(self, grid: Grid):
        box, value = self.rho(grid)
        return box, (None if value is None else value < 1.0)


def capsule_mask(grid: Grid, a, b, radius: float):
    """Voxels within ``radius`` mm of the segment a-b (vessels, bone shafts)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    box = grid.box(np.minimum(a, b) - radius, np.maximum(a, b) + radius)
    if box is None:
        return None, None
    x, y, z = grid.mesh(box)
    ab = b - a
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    dist2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
    return box, dist2 <= radius**2


# ----------------------------------------------------------------------------------------------
# Organs (their label values: `segany_pet.pet.organs`)

REF_VERTEX_Z = 945.0

# Reference-adult trunk cross-sections: z, half-width, half-depth, AP centre (mm). Below the
# crotch (z 45) only the thighs remain; above the shoulders (z 690) the neck takes over.
_TRUNK_PROFILE = np.array(
    [
        (45, 165, 105, 5),
        (110, 172, 108, 5),
        (235, 165, 108, 0),
        (300, 148, 108, 0),
        (400, 152, 110, 0),
        (500, 158, 110, 0),
        (600, 168, 100, 0),
        (650, 188, 85, -5),
        (675, 130, 70, -5),
        (690, 60, 58, -5),
    ],
    dtype=float,
)
_SPINE_Y = ((200, 300, 360, 450, 560, 640, 700, 800), (-55, -45, -45, -55, -62, -50, -30, -20))

# Lymph-node stations: reference centre and spread (mm, 1 SD) for node lesions.
_NODE_STATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cervical right": ((-35, 5, 740), (8, 10, 25)),
    "cervical left": ((35, 5, 740), (8, 10, 25)),
    "supraclavicular right": ((-55, 5, 670), (12, 10, 10)),
    "supraclavicular left": ((55, 5, 670), (12, 10, 10)),
    "axillary right": ((-130, -5, 600), (12, 15, 20)),
    "axillary left": ((130, -5, 600), (12, 15, 20)),
    "mediastinal": ((2, 15, 565), (8, 10, 20)),
    "hilar right": ((-40, -5, 530), (6, 8, 12)),
    "hilar left": ((40, -5, 530), (6, 8, 12)),
    "para-aortic": ((10, -15, 300), (12, 8, 35)),
    "mesenteric": ((0, 45, 270), (25, 15, 25)),
    "iliac right": ((-60, 5, 180), (10, 15, 25)),
    "iliac left": ((60, 5, 180), (10, 15, 25)),
    "inguinal right": ((-80, 45, 55), (12, 10, 15)),
    "inguinal left": ((80, 45, 55), (12, 10, 15)),
}
_PROSTATE_REF = (0.0, 22.0, 65.0)


@dataclass
class Anatomy:
    """One case's anatomy on one grid."""

    grid: Grid
    labels: np.ndarray  # uint8, ORGAN_NAMES values
    shapes: dict[str, list[Ellipsoid]]  # placed organ shapes, for sampling lesion sites
    stations: dict[str, tuple[np.ndarray, np.ndarray]]  # node station centre, spread (mm)
    prostate_mm: np.ndarray
    # (box, label value, uptake factor over the box): uneven uptake within an organ
    textures: list = field(default_factory=list)
    params: dict = field(default_factory=dict)  # JSON-able body parameters

    def label_at(self, mm) -> int:
        ijk = np.rint(self.grid.to_voxel(mm)).astype(int)
        if np.any(ijk < 0) or np.any(ijk >= self.grid.shape):
            return 0
        return int(self.labels[tuple(ijk)])


class _Body:
    """Per-case stature and girth; maps reference-adult positions into this case's body."""

    def __init__(self, rng: np.random.Generator):
        self.height = rng.uniform(0.93, 1.05)
        self.width = rng.uniform(0.88, 1.15)
        self.depth = self.width * rng.uniform(0.94, 1.06)
        self.fat_mm = (6.0 + 26.0 * (self.width - 0.88) / 0.27) * rng.uniform(0.75, 1.1)
        self.vertex_z = REF_VERTEX_Z + rng.uniform(-8.0, 4.0)
        self.shift = np.array([rng.normal(0, 5.0), rng.normal(0, 4.0)])
        # Girth comes mostly from fat and muscle, so organs spread less than the outline.
        self.organ_xy = 1.0 + 0.4 * (self.width - 1.0)
        self.head = rng.uniform(0.95, 1.05)  # head breadth varies little with girth

    def z(self, z_ref):
        return self.vertex_z - (REF_VERTEX_Z - np.asarray(z_ref, dtype=float)) * self.height

    def point(self, ref, jitter=(0.0, 0.0, 0.0)) -> np.ndarray:
        x, y, z = ref
        return np.array(
            [
                x * self.organ_xy + self.shift[0] + jitter[0],
                y * self.organ_xy + self.shift[1] + jitter[1],
                float(self.z(z)) + jitter[2],
            ]
        )

    def size(self, axes, factor: float = 1.0) -> np.ndarray:
        return np.array([axes[0] * self.organ_xy, axes[1] * self.organ_xy, axes[2] * self.height]) * factor

    def head_point(self, ref) -> np.ndarray:
        x, y, z = ref
        return np.array([x * self.head + self.shift[0], y * self.head + self.shift[1], float(self.z(z))])

    def head_size(self, axes) -> np.ndarray:
        return np.array([axes[0] * self.head, axes[1] * self.head, axes[2] * self.height])


def _outline_masks(grid: Grid, body: _Body) -> tuple[np.ndarray, np.ndarray]:
    """Whole body and its interior (body minus subcutaneous fat) as boolean volumes."""
    shape = grid.shape
    inside = np.zeros(shape, dtype=bool)
    interior = np.zeros(shape, dtype=bool)
    z_all = grid.origin[2] + np.arange(shape[2]) * grid.spacing[2]

    # Trunk: superellipse cross-sections, interpolated along z. The small arrays hold each
    # term per row/column and slice; only their sum is full-size.
    prof_z = body.z(_TRUNK_PROFILE[:, 0])
    k_trunk = np.flatnonzero((z_all >= prof_z[0]) & (z_all <= prof_z[-1]))
    if k_trunk.size:
        box = grid.box(
            (-260 + body.shift[0], -200 + body.shift[1], z_all[k_trunk[0]]),
            (260 + body.shift[0], 200 + body.shift[1], z_all[k_trunk[-1]]),
        )
        x, y, z = grid.mesh(box)
        zz = z[0, 0]
        width = np.interp(zz, prof_z, _TRUNK_PROFILE[:, 1]) * body.width
        depth = np.interp(zz, prof_z, _TRUNK_PROFILE[:, 2]) * body.depth
        y_c = np.interp(zz, prof_z, _TRUNK_PROFILE[:, 3]) + body.shift[1]
        p = 2.4
        xs = np.abs(x[:, :, 0] - body.shift[0])  # (nx, 1)
        yr = np.abs(y[0, :, 0][:, None] - y_c[None, :])  # (ny, nz)
        for target, shrink in ((inside, 0.0), (interior, body.fat_mm)):
            # The shoulders and neck base carry little fat; keep the interior from vanishing there.
            w = np.maximum(width - shrink, 0.55 * width)
            d = np.maximum(depth - shrink, 0.55 * depth)
            ax = (xs / w[None, :]) ** p  # (nx, nz)
            ay = (yr / d[None, :]) ** p  # (ny, nz)
            target[box] |= (ax[:, None, :] + ay[None, :, :]) <= 1.0

    # Thighs: two circles per slice, thicker towards the hips.
    leg_z = body.z(np.array([-150.0, 0.0, 100.0]))
    leg_r = np.array([66.0, 76.0, 86.0]) * body.width
    for side in (-1, 1):
        cx = side * 88.0 * body.organ_xy + body.shift[0]
        cy = 8.0 + body.shift[1]
        box = grid.box((cx - 110, cy - 110, grid.origin[2]), (cx + 110, cy + 110, leg_z[-1]))
        if box is None:
            continue
        x, y, z = grid.mesh(box)
        r = np.interp(z[0, 0], leg_z, leg_r)
        d2 = (x - cx) ** 2 + (y - cy) ** 2  # (nx, ny, 1)
        inside[box] |= d2 <= r**2
        interior[box] |= d2 <= np.maximum(r - body.fat_mm, 0.6 * r) ** 2

    # Neck, skull and face: no subcutaneous fat layer to speak of.
    neck_box = grid.box(
        (-70 + body.shift[0], -80 + body.shift[1], float(body.z(660))),
        (70 + body.shift[0], 70 + body.shift[1], float(body.z(800))),
    )
    if neck_box is not None:
        x, y, _ = grid.mesh(neck_box)
        neck = ((x - body.shift[0]) / 55.0) ** 2 + ((y - body.shift[1] + 5.0) / 58.0) ** 2 <= 1.0
        inside[neck_box] |= neck
        interior[neck_box] |= neck
    for centre, axes in (((0, 5, 855), (75, 95, 90)), ((0, 30, 775), (58, 60, 50))):
        box, m = Ellipsoid(body.head_point(centre), body.head_size(axes)).mask(grid)
        if box is not None:
            inside[box] |= m
            interior[box] |= m
    return inside, interior


def build_anatomy(grid: Grid, rng: np.random.Generator) -> Anatomy:
    """Draw one body (stature, girth, organ sizes and positions) and rasterise it on ``grid``.

    Every random draw happens in the same order whatever the grid, so a seed gives the same body
    on the 4 mm and the autoPET grid.
    """
    body = _Body(rng)
    bladder_fill = rng.uniform(0.45, 1.7)
    inside, interior = _outline_masks(grid, body)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    labels[inside] = ORGAN_LABELS["muscle"]
    labels[inside & ~interior] = ORGAN_LABELS["fat"]
    shapes: dict[str, list[Ellipsoid]] = {}
    textures: list = []

    def jitter(sd=6.0):
        return rng.normal(0.0, sd, 3).clip(-2 * sd, 2 * sd)

    def organ(ref_centre, ref_axes, power=2.0, rot=None, wobble=0.0, size_sd=0.08, sd=6.0):
        size = float(np.clip(rng.normal(1.0, size_sd), 1 - 2 * size_sd, 1 + 2 * size_sd))
        bumps = SmoothField(rng, wavelength_mm=0.9 * float(np.mean(ref_axes)), n_waves=6) if wobble else None
        return Ellipsoid(body.point(ref_centre, jitter(sd)), body.size(ref_axes, size), power, rot, wobble, bumps)

    def paint(name, box, mask, onto=None):
        if box is None:
            return
        region = labels[box]
        m = mask & interior[box]
        if onto is not None:
            m &= np.isin(region, [ORGAN_LABELS[n] for n in onto])
        region[m] = ORGAN_LABELS[name]

    def add(name, shape, onto=None, key=None):
        paint(name, *shape.mask(grid), onto=onto)
        shapes.setdefault(key or name, []).append(shape)

    # Bowel first (onto soft tissue only): a band-limited random field thresholded into loops.
    bowel_region = organ((0, 25, 255), (125, 70, 85), size_sd=0.05)
    loops = SmoothField(rng, wavelength_mm=45.0, n_waves=10)
    activity = SmoothField(rng, wavelength_mm=80.0, n_waves=6)
    box, rho = bowel_region.rho(grid)
    if box is not None:
        x, y, z = grid.mesh(box)
        rel = (x - bowel_region.centre[0], y - bowel_region.centre[1], z - bowel_region.centre[2])
        paint("bowel", box, (rho < 1.0) & (loops(*rel) > 0.45), onto=["muscle"])
        # Uneven bowel activity: focal hot loops are the classic physiological mimic.
        factor = np.clip(1.0 + 0.3 * activity(*rel), 0.4, 1.7).astype(np.float32)
        textures.append((box, ORGAN_LABELS["bowel"], factor))
    shapes["bowel"] = [bowel_region]

    add("lung_right", organ((-80, -5, 555), (65, 80, 115), 2.4, wobble=0.04))
    add("lung_left", organ((82, -5, 550), (62, 78, 110), 2.4, wobble=0.04))
    add("liver", organ((-55, 10, 410), (82, 75, 66), 2.2, rotation(-10), wobble=0.05, size_sd=0.1))
    add("liver", organ((15, 35, 425), (50, 35, 30), rot=rotation(10), wobble=0.05))
    add("spleen", organ((88, -40, 420), (28, 45, 52), rot=rotation(25), wobble=0.06, size_sd=0.12))
    for name, ref, tilt in (("kidney_right", (-68, -45, 325), -15), ("kidney_left", (70, -45, 340), 15)):
        kidney = organ(ref, (30, 27, 55), rot=rotation(0, tilt), wobble=0.03)
        add(name, kidney)
        side = -1 if name == "kidney_right" else 1
        pelvis_centre = kidney.centre + np.array([-side * 14.0, 6.0, -4.0])
        pelvis = Ellipsoid(pelvis_centre, kidney.axes * [0.45, 0.4, 0.45], rot=kidney.rot)
        paint("renal_pelvis", *pelvis.mask(grid), onto=[name])
    bladder = organ((0, 35, 110), np.array([40, 34, 32]) * bladder_fill ** (1 / 3), wobble=0.03, sd=4.0)
    add("bladder", bladder)

    # Red marrow: vertebral bodies with their discs, sacrum, iliac wings, femoral heads.
    z_ref = 200.0
    for count, height, r_lat, r_ap in ((5, 35.0, 24.0, 18.0), (12, 25.0, 17.0, 15.0), (7, 17.0, 10.0, 9.0)):
        for _ in range(count):
            zc = z_ref + height / 2
            y_ref = float(np.interp(zc, *_SPINE_Y))
            vertebra = Ellipsoid(
                np.array([body.shift[0], y_ref * body.organ_xy + body.shift[1], float(body.z(zc))]),
                np.array([r_lat, r_ap, 0.4 * height * body.height]),
                power=3.0,
            )
            add("bone_marrow", vertebra)
            z_ref += height
    add("bone_marrow", organ((0, -62, 180), (42, 16, 38), rot=rotation(0, 0, -25), sd=3.0))
    for side in (-1, 1):
        add("bone_marrow", organ((side * 95, -25, 222), (14, 46, 44), rot=rotation(side * 25), sd=3.0))
        head = organ((side * 85, 10, 115), (22, 22, 22), sd=3.0)
        add("bone_marrow", head)
        paint("bone_marrow", *capsule_mask(grid, head.centre, head.centre + [side * 10, 2, -55], 13.0))

    # Great vessels and heart; the left-ventricular wall is the myocardium that takes up FDG.
    path = [body.point(p) for p in ((10, 30, 535), (5, 22, 592), (12, -30, 592), (14, -8, 262))]
    for a, b in zip(path[:-1], path[1:], strict=True):
        paint("aorta", *capsule_mask(grid, a, b, 12.0 * body.organ_xy))
    heart_frame = frame_along((0.55, 0.6, -0.55))
    heart_jitter = jitter(5.0)
    heart = Ellipsoid(body.point((18, 22, 495), heart_jitter), body.size((58, 46, 52)), rot=heart_frame)
    add("heart_blood", heart, key="heart")
    ventricle = Ellipsoid(body.point((32, 25, 482), heart_jitter), body.size((45, 30, 30)), rot=heart_frame)
    wall = rng.uniform(9.0, 12.0)
    paint("heart_myocardium", *ventricle.mask(grid))
    paint("heart_blood", *Ellipsoid(ventricle.centre, ventricle.axes - wall, rot=heart_frame).mask(grid))
    shapes["heart"].append(ventricle)

    # Head: brain (with cerebellum), salivary and lacrimal glands.
    brain = Ellipsoid(body.head_point((0, 0, 868)), body.head_size((63, 80, 58)), 2.1)
    add("brain", brain)
    add("brain", Ellipsoid(body.head_point((0, -45, 815)), body.head_size((48, 30, 22))))
    box, rho = brain.rho(grid)
    if box is not None:
        # Grey matter lies at the surface; deep white matter takes up less.
        textures.append((box, ORGAN_LABELS["brain"], (0.82 + 0.26 * np.minimum(rho, 1.0)).astype(np.float32)))
    for side in (-1, 1):
        add("salivary_glands", Ellipsoid(body.head_point((side * 44, -5, 800)), body.head_size((12, 20, 24))))
        add("salivary_glands", Ellipsoid(body.head_point((side * 28, 30, 765)), body.head_size((11, 12, 9))))
        add("lacrimal_glands", Ellipsoid(body.head_point((side * 33, 85, 848)), body.head_size((8, 6, 5))))

    stations = {
        name: (body.point(centre), np.array(spread) * [body.organ_xy, body.organ_xy, body.height])
        for name, (centre, spread) in _NODE_STATIONS.items()
    }
    params = {
        "height_factor": round(float(body.height), 4),
        "girth_factor": round(float(body.width), 4),
        "fat_mm": round(float(body.fat_mm), 2),
        "bladder_fill": round(float(bladder_fill), 3),
        "vertex_z_mm": round(float(body.vertex_z), 2),
    }
    return Anatomy(grid, labels, shapes, stations, body.point(_PROSTATE_REF), textures, params)


def organ_core(organs: np.ndarray, spacing, names, margin_mm: float = 8.0) -> np.ndarray:
    """Voxels of the named organ(s) at least ``margin_mm`` from their boundary (full-size bool).

    Used to read an organ's uptake or noise away from partial-volume edges.
    """
    names = [names] if isinstance(names, str) else list(names)
    values = [ORGAN_LABELS[n] for n in names]
    member = np.isin(organs, values)
    core = np.zeros(organs.shape, dtype=bool)
    boxes = ndimage.find_objects(member.astype(np.uint8))
    if not boxes or boxes[0] is None:
        return core
    pad = [int(np.ceil(margin_mm / s)) + 1 for s in spacing]
    box = tuple(
        slice(max(sl.start - p, 0), min(sl.stop + p, n)) for sl, p, n in zip(boxes[0], pad, organs.shape, strict=True)
    )
    depth = ndimage.distance_transform_edt(member[box], sampling=spacing)
    core[box] = depth > margin_mm
    return core


# ----------------------------------------------------------------------------------------------
# Tracer uptake (SUV at ~60 min, per organ)

# Ranges: pet.md section 2; "est." marks our own estimates where pet.md gives none.
UPTAKE_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "fdg": {
        "muscle": (0.6, 1.0),
        "fat": (0.2, 0.4),
        "brain": (7.0, 10.0),
        "lung": (0.4, 0.6),
        "heart_myocardium": (1.5, 15.0),  # bimodal, see draw_uptake
        "blood": (1.5, 2.0),
        "liver": (1.9, 2.5),
        "spleen": (1.6, 2.0),
        "kidney": (2.0, 4.0),
        "renal_pelvis": (5.0, 30.0),
        "bladder": (5.0, 50.0),
        "bowel": (1.5, 4.0),
        "bone_marrow": (1.3, 2.0),
        "salivary_glands": (1.5, 3.0),  # est.
        "lacrimal_glands": (1.0, 2.0),  # est.
    },
    "psma": {  # 68Ga-PSMA-11
        "muscle": (0.4, 0.9),  # est.
        "fat": (0.1, 0.3),  # est.
        "brain": (0.1, 0.3),  # est.
        "lung": (0.2, 0.5),  # est.
        "heart_myocardium": (1.0, 2.5),  # est.
        "blood": (1.0, 2.0),
        "liver": (4.0, 8.0),
        "spleen": (5.0, 10.0),
        "kidney": (20.0, 50.0),
        "renal_pelvis": (20.0, 80.0),  # est.
        "bladder": (10.0, 100.0),
        "bowel": (8.0, 20.0),
        "bone_marrow": (0.8, 1.8),  # est.
        "salivary_glands": (10.0, 25.0),
        "lacrimal_glands": (5.0, 15.0),  # est.
    },
}
TRACERS = tuple(UPTAKE_RANGES)
# Uptake groups shared by several labels.
_UPTAKE_GROUP = {
    "lung_left": "lung",
    "lung_right": "lung",
    "heart_blood": "blood",
    "aorta": "blood",
    "kidney_left": "kidney",
    "kidney_right": "kidney",
}
# Urine activity spans an order of magnitude: draw it log-uniformly.
_LOG_UNIFORM = {"bladder", "renal_pelvis"}


def draw_uptake(tracer: str, rng: np.random.Generator) -> dict[str, float]:
    """One case's SUV per organ label name, random within the tracer's literature ranges."""
    if tracer not in UPTAKE_RANGES:
        raise ValueError(f"unknown tracer {tracer!r}; choose one of {list(TRACERS)}")
    groups: dict[str, float] = {}
    for group, (lo, hi) in UPTAKE_RANGES[tracer].items():
        if group in _LOG_UNIFORM:
            groups[group] = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        else:
            groups[group] = float(rng.uniform(lo, hi))
    if tracer == "fdg":
        # Myocardial FDG is bimodal: suppressed after fasting, or avid (glucose-driven).
        avid = rng.random() < 0.5
        groups["heart_myocardium"] = float(rng.uniform(5.0, 15.0) if avid else rng.uniform(1.5, 3.0))
    return {name: round(groups[_UPTAKE_GROUP.get(name, name)], 4) for name in ORGAN_NAMES.values()}


def uptake_image(anatomy: Anatomy, uptake: dict[str, float]) -> np.ndarray:
    """Noise-free, unblurred SUV of the anatomy (float32)."""
    lookup = np.zeros(256, dtype=np.float32)
    for value, name in ORGAN_NAMES.items():
        lookup[value] = uptake[name]
    suv = lookup[anatomy.labels]
    for box, value, factor in anatomy.textures:
        region = suv[box]
        member = anatomy.labels[box] == value
        region[member] *= factor[member]
    return suv
