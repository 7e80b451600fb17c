"""speckle_rec: classical trackerless 3D freehand ultrasound reconstruction (TUS-REC contract).

``speckle_rec.predict_ddfs(frames, landmark, data_path_calib, device=None)`` is the drop-in body of
the challenge's submission function; the command line is ``speckle-rec``.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import speckle_rec` stays light for the CLI's argument parsing.
    if name == "predict_ddfs":
        from .reconstruct import predict_ddfs

        return predict_ddfs
    raise AttributeError(f"module 'speckle_rec' has no attribute '{name}'")
