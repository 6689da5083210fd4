"""DICOM folders: files written here with pydicom (MONOCHROME1/2, rescale slope/intercept, a window, 8- and 16-bit,
RGB, an extension-less file with the preamble), read by dicom.read_dicom and through a folder, against 8-bit
arrays computed in the test from the DICOM standard's formulas; bad files and a missing pydicom give one line."""
import sys

import numpy as np
import pytest

import dataset
import dicom

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage,  # noqa: E402
                         generate_uid)


def write_dicom(path, a, photometric="MONOCHROME2", frames=1, **tags):
    """a: (H, W) uint8/uint16 or (H, W, 3) uint8 stored values; tags: e.g. RescaleSlope, WindowCenter."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = a.shape[:2]
    ds.SamplesPerPixel = 3 if a.ndim == 3 else 1
    if a.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = 8 * a.dtype.itemsize
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(np.stack([a] * frames) if frames > 1 else a).tobytes()
    ds.save_as(path, enforce_file_format=True)


def window8(x, c, w):
    """DICOM PS3.3 C.11.2.1.2.1, linear VOI function, output range 0..255, written piecewise as the standard does."""
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    y = np.where(x <= lo, 0.0, np.where(x > hi, 255.0, ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0))
    return np.round(y).astype(np.uint8)


rng = np.random.default_rng(0)
A16 = rng.integers(0, 4096, (12, 10)).astype(np.uint16)  # 12-bit values in 16 bits, as CR/DX store them


def minmax8(x):
    return np.round((x - x.min()) * (255.0 / (x.max() - x.min()))).astype(np.uint8)


def test_monochrome2_16_bit_without_window_is_its_own_min_max(tmp_path):
    write_dicom(tmp_path / "a.dcm", A16)
    assert np.array_equal(dicom.read_dicom(str(tmp_path / "a.dcm")), minmax8(A16.astype(np.float64)))


def test_rescale_then_window_then_monochrome1_inverted(tmp_path):
    write_dicom(tmp_path / "w.dcm", A16, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=1500, WindowWidth=3000)
    hu = A16.astype(np.float64) * 2 - 1024  # modality values
    expected = window8(hu, 1500.0, 3000.0)
    assert np.array_equal(dicom.read_dicom(str(tmp_path / "w.dcm")), expected)
    write_dicom(tmp_path / "m1.dcm", A16, "MONOCHROME1", RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=1500,
                WindowWidth=3000)
    assert np.array_equal(dicom.read_dicom(str(tmp_path / "m1.dcm")), 255 - expected)
    # a narrow window clips: values below it black, above it white
    write_dicom(tmp_path / "n.dcm", A16, WindowCenter=[2000, 100], WindowWidth=[400, 50])  # the first window
    out = dicom.read_dicom(str(tmp_path / "n.dcm"))
    assert np.array_equal(out, window8(A16.astype(np.float64), 2000.0, 400.0))
    assert (out[A16 < 1700] == 0).all() and (out[A16 > 2300] == 255).all()


def test_8_bit_and_rgb(tmp_path):
    a8 = rng.integers(10, 200, (9, 7)).astype(np.uint8)
    write_dicom(tmp_path / "g.dcm", a8)
    assert np.array_equal(dicom.read_dicom(str(tmp_path / "g.dcm")), minmax8(a8.astype(np.float64)))
    rgb = rng.integers(0, 256, (9, 7, 3)).astype(np.uint8)
    write_dicom(tmp_path / "c.dcm", rgb, "RGB")
    assert np.array_equal(dicom.read_dicom(str(tmp_path / "c.dcm")), rgb)  # colour kept as stored


def test_a_folder_of_dicom_files_with_and_without_extension(tmp_path):
    """A Kather-layout folder: .dcm files in one class, extension-less DICOM (PACS exports) in the other, a dotfile
    and a text file ignored; gray, at the stored size (no resampling), as read_dicom gives them."""
    root = tmp_path / "cxr"
    (root / "normal").mkdir(parents=True)
    (root / "sick").mkdir()
    imgs = {}
    for i in range(10):
        a = rng.integers(0, 4096, (16, 16)).astype(np.uint16)
        path = root / "normal" / f"n{i}.dcm" if i < 5 else root / "sick" / f"IM{i:04d}"
        write_dicom(path, a, WindowCenter=2048, WindowWidth=4096)
        imgs[i] = window8(a.astype(np.float64), 2048.0, 4096.0)
    (root / "sick" / ".DS_Store").write_bytes(b"\0" * 200)
    (root / "sick" / "notes").write_text("not an image")
    ds = dataset.load(str(root), 16, str(tmp_path / "cache"), seed=0)
    assert ds["channels"] == 1 and ds["n_classes"] == 2
    got = sorted(x.numpy().tobytes() for s in dataset.SPLITS for x in ds[s][0][:, 0])
    assert got == sorted(v.tobytes() for v in imgs.values())
    assert sum(len(ds[s][1]) for s in dataset.SPLITS) == 10


def test_bad_dicom_files_give_one_line_naming_the_file(tmp_path, monkeypatch):
    (tmp_path / "bad.dcm").write_bytes(b"this is not a DICOM file at all" * 10)
    with pytest.raises(ValueError, match=r"bad\.dcm: unreadable DICOM file"):
        dicom.read_dicom(str(tmp_path / "bad.dcm"))
    write_dicom(tmp_path / "cut.dcm", A16)
    data = (tmp_path / "cut.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:len(data) - 100])  # a copy that stopped early
    with pytest.raises(ValueError, match=r"cut\.dcm: (truncated or corrupt pixel data|unreadable DICOM file)"):
        dicom.read_dicom(str(tmp_path / "cut.dcm"))
    write_dicom(tmp_path / "cine.dcm", A16, frames=3)
    with pytest.raises(ValueError, match=r"cine\.dcm: multi-frame DICOM \(3 frames\)"):
        dicom.read_dicom(str(tmp_path / "cine.dcm"))
    write_dicom(tmp_path / "nopix.dcm", A16)
    d = pydicom.dcmread(tmp_path / "nopix.dcm")
    del d.PixelData
    d.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    with pytest.raises(ValueError, match=r"nopix\.dcm: DICOM file without pixel data"):
        dicom.read_dicom(str(tmp_path / "nopix.dcm"))
    # compressed pixel data that no installed plugin decodes: one line naming the syntax and the decoders to install
    write_dicom(tmp_path / "jpeg.dcm", A16.astype(np.uint8))
    d = pydicom.dcmread(tmp_path / "jpeg.dcm")
    d.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    d.PixelData = encapsulate([b"\xff\xd8\xff\xe0 not really a JPEG \xff\xd9"])
    d["PixelData"].VR = "OB"
    d.save_as(tmp_path / "jpeg.dcm", enforce_file_format=True)
    with pytest.raises(ValueError, match=r"jpeg\.dcm: cannot decode its JPEG Baseline .*pip install pylibjpeg") as e:
        dicom.read_dicom(str(tmp_path / "jpeg.dcm"))
    assert "\n" not in str(e.value)
    write_dicom(tmp_path / "ok.dcm", A16)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"ok\.dcm: a DICOM file, and pydicom is not installed: pip install pydicom"):
        dicom.read_dicom(str(tmp_path / "ok.dcm"))
    # and through a folder: the same line, naming the first DICOM file it met (PNGs alone would still load)
    for c in ("a", "b"):
        (tmp_path / "dcmdir" / c).mkdir(parents=True)
        for i in range(3):
            write_dicom(tmp_path / "dcmdir" / c / f"{i}.dcm", A16)
    with pytest.raises(ValueError, match=r"\.dcm: a DICOM file, and pydicom is not installed: pip install pydicom"):
        dataset.load(str(tmp_path / "dcmdir"), 28, str(tmp_path / "cache"))
