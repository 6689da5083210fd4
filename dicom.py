"""DICOM files in an image folder: which files are DICOM, and their pixels as the 8-bit image a viewer shows.
dataset.py reads a class folder's DICOM files through read_dicom; pydicom is imported only when one is met."""
import os

import numpy as np


def is_dicom(path):
    """A .dcm file, or an extension-less file with the DICOM preamble ('DICM' at byte 128), as PACS exports are."""
    if path.lower().endswith(".dcm"):
        return True
    if os.path.splitext(path)[1] or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def read_dicom(path):
    """A DICOM file's pixels as the 8-bit image a radiologist sees: (H, W) uint8 for MONOCHROME1/2, (H, W, 3) RGB.

    Stored values -> modality values (Rescale Slope / Intercept, or the Modality LUT); then the file's first VOI
    window (Window Center / Width, DICOM PS3.3 C.11.2.1.2's linear function) or VOI LUT, else the image's own
    min..max, mapped to 0..255; MONOCHROME1 (high values dark) inverted. Multi-frame files (CT/MR series, cine) are
    refused: one image per file is what a class folder of images means; split series into files first."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise ValueError(f"{path}: a DICOM file, and pydicom is not installed: pip install pydicom") from None
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises InvalidDicomError, EOFError, struct errors... on bad files
        raise ValueError(f"{path}: unreadable DICOM file ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM file without pixel data (a report or structured document?)")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{path}: multi-frame DICOM ({ds.NumberOfFrames} frames); medssl reads one image per file")
    try:
        a = ds.pixel_array
    except Exception as e:
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is not None and syntax.is_compressed:  # JPEG and friends need a decoder plugin
            raise ValueError(f"{path}: cannot decode its {syntax.name} pixel data ({' '.join(str(e).split())}); "
                             "it may be corrupt, or need a decoder: pip install pylibjpeg pylibjpeg-libjpeg "
                             "pylibjpeg-openjpeg") from None
        raise ValueError(f"{path}: truncated or corrupt pixel data ({type(e).__name__}: {e})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "RGB" or a.ndim == 3:
        if photometric != "RGB":  # YBR_* colour: pydicom converts to RGB by default; anything else is unknown here
            raise ValueError(f"{path}: colour DICOM in {photometric}, expected RGB")
        return np.ascontiguousarray(a.astype(np.uint8) if a.dtype == np.uint8 else
                                    _range8(a.astype(np.float64), a.min(), a.max()))
    x = np.asarray(apply_modality_lut(a, ds), dtype=np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
        c, w = first(ds.WindowCenter), max(first(ds.WindowWidth), 1.0)
        y = np.clip(((x - (c - 0.5)) / (w - 1 if w > 1 else 1) + 0.5) * 255.0, 0, 255)  # PS3.3 C.11.2.1.2.1
        y = np.round(y).astype(np.uint8)
    elif "VOILUTSequence" in ds:
        v = np.asarray(apply_voi_lut(x, ds), dtype=np.float64)
        y = _range8(v, v.min(), v.max())
    else:
        y = _range8(x, x.min(), x.max())
    return 255 - y if photometric == "MONOCHROME1" else y


def _range8(x, lo, hi):
    """x linearly from lo..hi to 0..255, uint8 (a constant image becomes 0)."""
    return np.round((x - lo) * (255.0 / max(hi - lo, 1e-12))).clip(0, 255).astype(np.uint8)
