"""Image datasets on tiny archives made here: EDM's dataset zip and class folders."""
import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from dmd2.data import ImageFolderDataset, ImageZipDataset, open_image_dataset


def png_bytes(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def rgb(seed: int, size: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_zip(path, files: dict, labels=None, write_json=True):
    with zipfile.ZipFile(path, "w") as z:
        for name in files:  # written in the given order; the dataset must sort
            z.writestr(name, png_bytes(files[name]))
        if write_json:
            z.writestr("dataset.json", json.dumps({"labels": labels}))
    return path


@pytest.fixture
def edm_zip(tmp_path):
    files = {"00000/img00000002.png": rgb(2), "00000/img00000000.png": rgb(0), "00000/img00000001.png": rgb(1)}
    labels = [["00000/img00000000.png", 7], ["00000/img00000001.png", 0], ["00000/img00000002.png", 3]]
    return make_zip(tmp_path / "ds.zip", files, labels), files


def test_edm_zip_images_labels_order_and_range(edm_zip):
    path, files = edm_zip
    ds = ImageZipDataset(path)
    assert len(ds) == 3 and ds.names == sorted(files)
    assert [ds[i][1] for i in range(3)] == [7, 0, 3] and ds.num_classes == 8
    for i, name in enumerate(sorted(files)):
        img, _ = ds[i]
        assert img.shape == (3, 4, 4) and img.dtype == torch.float32
        expected = torch.from_numpy(files[name]).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(img, expected, rtol=0, atol=0)
        assert img.min() >= -1 and img.max() <= 1
    raw, _ = ImageZipDataset(path, as_uint8=True)[0]
    assert raw.dtype == torch.uint8 and torch.equal(raw, torch.from_numpy(files[sorted(files)[0]]).permute(2, 0, 1))
    assert ds[-1][1] == 3
    with pytest.raises(IndexError):
        ds[3]


def test_extreme_values_map_to_minus_one_and_one(tmp_path):
    files = {"a.png": np.zeros((2, 2, 3), np.uint8), "b.png": np.full((2, 2, 3), 255, np.uint8)}
    ds = ImageZipDataset(make_zip(tmp_path / "x.zip", files, [["a.png", 0], ["b.png", 1]]))
    assert torch.all(ds[0][0] == -1) and torch.all(ds[1][0] == 1)


def test_zip_label_errors(tmp_path):
    files = {"a.png": rgb(0), "b.png": rgb(1)}
    with pytest.raises(ValueError, match="no dataset.json"):
        ImageZipDataset(make_zip(tmp_path / "1.zip", files, write_json=False))
    assert ImageZipDataset(tmp_path / "1.zip", use_labels=False)[1][1] == -1
    with pytest.raises(ValueError, match="no labels"):
        ImageZipDataset(make_zip(tmp_path / "2.zip", files, None))
    with pytest.raises(ValueError, match="1 images have no label.*b.png"):
        ImageZipDataset(make_zip(tmp_path / "3.zip", files, [["a.png", 0]]))
    with pytest.raises(ValueError, match="non-negative integer"):
        ImageZipDataset(make_zip(tmp_path / "4.zip", files, [["a.png", 0], ["b.png", [0.5, 0.5]]]))
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageZipDataset(tmp_path / "missing.zip")
    (tmp_path / "notzip.zip").write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a zip"):
        ImageZipDataset(tmp_path / "notzip.zip")
    with pytest.raises(ValueError, match="no images"):
        ImageZipDataset(make_zip(tmp_path / "5.zip", {}, []))


def test_resolution_and_channels(tmp_path):
    files = {"a.png": rgb(0, 4), "b.png": rgb(1, 8)}
    path = make_zip(tmp_path / "r.zip", files, [["a.png", 0], ["b.png", 1]])
    ds = ImageZipDataset(path, resolution=4)
    assert ds[0][0].shape == (3, 4, 4)
    with pytest.raises(ValueError, match="b.png.*8x8, expected 4x4"):
        ds[1]
    gray = ImageZipDataset(path, channels=1)[0][0]
    assert gray.shape == (1, 4, 4)
    lum = np.array(Image.fromarray(files["a.png"]).convert("L"))
    torch.testing.assert_close(gray[0], torch.from_numpy(lum).float() / 127.5 - 1)
    rgba = {"c.png": np.zeros((2, 2, 4), np.uint8)}
    p2 = make_zip(tmp_path / "rgba.zip", rgba, [["c.png", 0]])
    with pytest.raises(ValueError, match="mode 'RGBA'.*channels"):
        ImageZipDataset(p2)[0]
    assert ImageZipDataset(p2, channels=3)[0][0].shape == (3, 2, 2)
    with pytest.raises(ValueError, match="channels"):
        ImageZipDataset(path, channels=2)


def test_zip_dataset_pickles_for_workers_and_loader(edm_zip):
    path, _ = edm_zip
    ds = ImageZipDataset(path)
    ds[0]  # opens the archive in this process
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[2][0], ds[2][0])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False)))
    assert batch[0].shape == (3, 3, 4, 4) and batch[1].tolist() == [7, 0, 3]


def make_folder(root, layout: dict):
    for rel, arr in layout.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(p)
    return root


def test_class_folders_labels_and_order(tmp_path):
    layout = {"zebra/b.png": rgb(0), "zebra/a.png": rgb(1), "ant/x/deep.png": rgb(2), "ant/c.jpg": rgb(3),
              "mouse/m.png": rgb(4)}
    root = make_folder(tmp_path / "imgs", layout)
    (root / "ant" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(root)
    assert ds.classes == ["ant", "mouse", "zebra"] and ds.num_classes == 3
    assert ds.names == ["ant/c.jpg", "ant/x/deep.png", "mouse/m.png", "zebra/a.png", "zebra/b.png"]
    assert [ds[i][1] for i in range(len(ds))] == [0, 0, 1, 2, 2]
    img, _ = ds[3]
    torch.testing.assert_close(img, torch.from_numpy(layout["zebra/a.png"]).permute(2, 0, 1).float() / 127.5 - 1)
    again = ImageFolderDataset(root)
    assert again.names == ds.names and again.labels == ds.labels
    assert isinstance(open_image_dataset(root), ImageFolderDataset)


def test_class_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "empty")
    root = make_folder(tmp_path / "loose", {"a/x.png": rgb(0), "y.png": rgb(1)})
    with pytest.raises(ValueError, match="no class"):
        ImageFolderDataset(root)
    root = make_folder(tmp_path / "hole", {"a/x.png": rgb(0)})
    (root / "b").mkdir()
    with pytest.raises(ValueError, match="without images.*'b'"):
        ImageFolderDataset(root)
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        open_image_dataset(tmp_path / "nothing")


def test_open_image_dataset_zip(edm_zip):
    path, _ = edm_zip
    ds = open_image_dataset(path, as_uint8=True)
    assert isinstance(ds, ImageZipDataset) and ds[0][0].dtype == torch.uint8
