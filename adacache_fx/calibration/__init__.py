"""Calibration: fit the schedule (codebook thresholds, MoReg normaliser) to the user's model from a
few of its own generations: record (``record``) → predict (``fit``) → check (``calibrate``)."""
from .calibrate import CalibrationResult, calibrate
from .fit import simulate
from .record import Trajectory, TrajectoryRecorder

__all__ = ["CalibrationResult", "Trajectory", "TrajectoryRecorder", "calibrate", "simulate"]
