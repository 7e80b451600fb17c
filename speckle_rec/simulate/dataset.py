"""Simulated tracked scans and whole data folders in the challenge layout (`speckle-rec simulate`).

A scan's tracker poses are ``tforms[k] = image_to_world[k] · image_to_tool⁻¹`` (see probe.py), so
the contract's formulas give back the simulated motion exactly; frames are rendered lazily, chunk by
chunk, while they are written.
"""

import zlib
from dataclasses import dataclass

import numpy as np

from ..calibration import Calibration
from ..errors import DataError
from ..io import ScanData, write_dataset
from ..transforms import invert_rigid
from .motion import DIRECTIONS, HANDS, PLANES, PROTOCOLS, probe_trajectory, sample_landmarks, scan_name
from .probe import Probe
from .render import render_frames
from .tissue import Beam, Tissue

LANDMARKS_2025 = 100
LANDMARKS_2024 = 20


def _seed(*parts):
    """A stable 32-bit seed from any printable parts (independent of Python's hash salt)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


@dataclass(frozen=True)
class RenderedFrames:
    """Frames of a simulated scan, rendered on demand: ``frames[a:b]`` renders poses a..b−1.

    Attributes
    ----------
    image_to_world : ndarray, shape (N, 4, 4)
    probe, tissue, beam
        The simulation settings.
    """

    image_to_world: np.ndarray
    probe: Probe
    tissue: Tissue
    beam: Beam

    @property
    def shape(self):
        return (self.image_to_world.shape[0], self.probe.height, self.probe.width)

    @property
    def dtype(self):
        return np.dtype(np.uint8)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        if not isinstance(index, slice):
            raise TypeError("RenderedFrames supports slices only, e.g. frames[0:64]")
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise TypeError("RenderedFrames supports contiguous slices only")
        return render_frames(self.image_to_world[start:stop], probe=self.probe, tissue=self.tissue,
                             beam=self.beam, first_frame=start)


@dataclass(frozen=True)
class SimulatedScan:
    """A simulated tracked scan with its ground truth.

    Attributes
    ----------
    subject, name : str
    image_to_world : ndarray, shape (N, 4, 4), float64
        True probe poses (image-mm → world mm).
    tforms : ndarray, shape (N, 4, 4), float64
        Tool → camera poses as the tracker records them.
    landmarks : ndarray, shape (K, 3), int64
    frames : RenderedFrames
        Lazily rendered uint8 frames (N, H, W); ``frames[a:b]`` renders a chunk.
    """

    subject: str
    name: str
    image_to_world: np.ndarray
    tforms: np.ndarray
    landmarks: np.ndarray
    frames: RenderedFrames

    def as_scan_data(self, *, tracked=True):
        return ScanData(self.subject, self.name, self.frames, self.tforms if tracked else None, self.landmarks)


def simulate_scan(n_frames, *, protocol="rotation", subject="000", hand="LH", plane="per", direction="DtP",
                  probe=None, tissue=None, beam=None, calibration=None, landmarks=None, seed=0):
    """Simulate one tracked scan (poses, tracker tforms, landmarks; frames rendered lazily).

    Parameters
    ----------
    n_frames : int
        Frames N ≥ 2 (20 frames/s).
    protocol : {'rotation', 'linear', 'c-shape', 's-shape'}
    subject : str
        Subject folder name; with ``hand`` it picks the tissue (one forearm per subject and hand).
    hand : {'LH', 'RH'}
    plane : {'per', 'par'}
    direction : {'DtP', 'PtD'}
        2024 sweep variants (ignored for ``rotation``).
    probe : Probe, optional
        Default ``Probe()`` (480 x 640 at the challenge spacing).
    tissue : Tissue, optional
        Default: ``Tissue.forearm`` seeded from (seed, subject, hand).
    beam : Beam, optional
    calibration : Calibration, optional
        Its ``image_to_tool`` turns poses into tracker tforms (default: the challenge's).
    landmarks : int, optional
        Landmark count (default 100 for rotation, 20 for the 2024 sweeps).
    seed : int

    Returns
    -------
    SimulatedScan
    """
    if hand not in HANDS:
        raise DataError(f"unknown hand '{hand}' (expected one of {', '.join(HANDS)})")
    probe = Probe() if probe is None else probe
    calibration = Calibration.default() if calibration is None else calibration
    if not np.allclose(calibration.spacing_mm, probe.spacing_mm, rtol=1e-6):
        raise DataError(f"probe spacing {probe.spacing_mm} differs from the calibration's {calibration.spacing_mm}")
    tissue = Tissue.forearm(seed=_seed(seed, subject, hand)) if tissue is None else tissue
    beam = Beam() if beam is None else beam
    name = scan_name(protocol, hand=hand, plane=plane, direction=direction)
    scan_seed = _seed(seed, subject, name)
    poses = probe_trajectory(n_frames, protocol=protocol, probe=probe, plane=plane, direction=direction,
                             seed=scan_seed)
    count = (LANDMARKS_2025 if protocol == "rotation" else LANDMARKS_2024) if landmarks is None else landmarks
    return SimulatedScan(
        subject=subject,
        name=name,
        image_to_world=poses,
        tforms=poses @ invert_rigid(calibration.image_to_tool),
        landmarks=sample_landmarks(poses, probe=probe, count=count, seed=scan_seed),
        frames=RenderedFrames(poses, probe, tissue, beam),
    )


def protocol_scans(protocol, *, hands=HANDS, planes=PLANES, directions=DIRECTIONS):
    """(hand, plane, direction) of every scan a subject has under ``protocol``.

    2025 ``rotation``: one per hand. 2024 sweeps: every hand × plane × direction.
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol '{protocol}' (expected one of {', '.join(PROTOCOLS)})")
    if protocol == "rotation":
        return [(hand, "per", "DtP") for hand in hands]
    return [(h, p, d) for h in hands for p in planes for d in directions]


def simulate_dataset(out_dir, *, protocol="rotation", subjects=("000",), n_frames=1500, layout="train",
                     probe=None, seed=0, hands=HANDS, planes=PLANES, directions=DIRECTIONS, on_chunk=None):
    """Write a simulated data folder in the challenge layout.

    Parameters
    ----------
    out_dir : str or Path
    protocol : {'rotation', 'linear', 'c-shape', 's-shape'}
    subjects : sequence of str
        Subject folder names, e.g. ``("000", "001")``.
    n_frames : int
        Frames per scan.
    layout : {'train', 'test'}
        ``test`` writes ``frames/``, ``transfs/`` (the ground truth) and ``dataset_keys.h5``.
    probe : Probe, optional
        Image size and fan (default 480 x 640).
    seed : int
    hands, planes, directions : sequences
        Which scans each subject gets (see :func:`protocol_scans`).
    on_chunk : callable, optional
        Called with the number of frames written after each chunk (progress bars).

    Returns
    -------
    list of SimulatedScan
        What was written (poses and landmarks in memory; frames are on disk).
    """
    probe = Probe() if probe is None else probe
    calibration = Calibration(np.diag([*probe.spacing_mm, 1.0, 1.0]), Calibration.default().image_to_tool)
    variants = protocol_scans(protocol, hands=hands, planes=planes, directions=directions)
    scans = [
        simulate_scan(n_frames, protocol=protocol, subject=subject, hand=h, plane=p, direction=d, probe=probe,
                      calibration=calibration, seed=seed)
        for subject in subjects
        for h, p, d in variants
    ]
    landmark_folder = "landmark" if protocol != "rotation" and layout == "test" else "landmarks"
    write_dataset(out_dir, [s.as_scan_data() for s in scans], layout=layout, calibration=calibration,
                  landmark_folder=landmark_folder, on_chunk=on_chunk)
    return scans
