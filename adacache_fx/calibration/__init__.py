"""Calibration: fit the schedule (codebook thresholds, MoReg normaliser) to the user's model from a
few of its own generations: record (``record``) → predict (``fit``) → check (``calibrate``, against
PSNR or the perceptual ``quality.ms_gmsd``)."""
from .calibrate import CalibrationResult, calibrate
from .fit import simulate
from .quality import ms_gmsd
from .record import Trajectory, TrajectoryRecorder

__all__ = ["CalibrationResult", "Trajectory", "TrajectoryRecorder", "calibrate", "ms_gmsd", "simulate"]
