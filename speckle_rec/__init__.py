"""speckle_rec: classical trackerless 3D freehand ultrasound reconstruction (TUS-REC contract)."""

__version__ = "0.1.0"
