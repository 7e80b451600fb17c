"""Speckle-physics simulation of tracked freehand ultrasound scans with exact ground truth."""
