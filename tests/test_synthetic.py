import json

import pytest
import torch

from ddkit.engine import make_generator
from ddkit.errors import ArtifactError
from ddkit.synthetic import SyntheticSet, save_grid


def test_from_real_is_class_major_and_real(digits):
    syn = SyntheticSet.from_real(digits, 3, make_generator(0, "init"))
    assert syn.images.shape == (30, 1, 8, 8)
    assert syn.hard_labels().tolist() == [c for c in range(10) for _ in range(3)]
    # every image is one of the real training images of its class
    for i in range(len(syn)):
        c = int(syn.labels[i])
        pool = digits.train_images[digits.class_indices()[c]]
        assert (pool - syn.images[i]).abs().flatten(1).amax(1).min() < 1e-6


def test_noise_init_and_seed_determinism(digits):
    a = SyntheticSet.from_real(digits, 2, make_generator(5, "init"), init="noise")
    b = SyntheticSet.from_real(digits, 2, make_generator(5, "init"), init="noise")
    assert torch.equal(a.images, b.images)


def test_save_load_roundtrip_with_soft_labels_and_extras(digits, tmp_path):
    syn = SyntheticSet.from_real(digits, 2, make_generator(0), soft_labels=True, learn_labels=True)
    syn.extras["lr"] = torch.nn.Parameter(torch.tensor([0.02]))
    syn.meta.update({"method": "test", "seed": 3, "iterations": 7, "metrics": {"loss": 1.5}})
    syn.save(tmp_path)
    meta = json.loads((tmp_path / "synset.json").read_text())
    assert meta["method"] == "test" and meta["dataset"] == "digits" and meta["ipc"] == 2
    assert meta["preprocess"]["mean"] and meta["version"]
    back = SyntheticSet.load(tmp_path)
    assert torch.equal(back.images, syn.images.detach())
    assert back.is_soft and torch.allclose(back.labels, syn.labels)
    assert back.labels.requires_grad  # learnable labels stay learnable
    assert back.learned_lr == pytest.approx(0.02)
    assert back.meta["metrics"]["loss"] == 1.5
    # the .safetensors alone is self-describing
    assert SyntheticSet.load(tmp_path / "synset.safetensors").dataset == "digits"


def test_zca_set_roundtrip(tmp_path):
    from ddkit.data import load_dataset

    real = load_dataset("digits", zca=True)
    syn = SyntheticSet.from_real(real, 1, make_generator(0))
    syn.save(tmp_path)
    back = SyntheticSet.load(tmp_path)
    assert back.preprocess.uses_zca
    assert torch.allclose(back.decoded(), syn.decoded(), atol=1e-5)


def test_not_a_synset(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ArtifactError, match="not a ddkit synthetic set"):
        SyntheticSet.load(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ArtifactError, match="no 'ddkit' metadata"):
        SyntheticSet.load(other)
    with pytest.raises(ArtifactError, match="no synthetic set"):
        SyntheticSet.load(tmp_path / "missing")


def test_export_and_grid(digits, tmp_path):
    from PIL import Image

    syn = SyntheticSet.from_real(digits, 2, make_generator(0))
    out = syn.export(tmp_path / "exp")
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 20
    lines = (out / "labels.csv").read_text().strip().splitlines()
    assert lines[0].startswith("file,label") and len(lines) == 21
    save_grid(syn, tmp_path / "grid.png")
    img = Image.open(tmp_path / "grid.png")
    assert img.size[0] > 16 and img.size[1] > 16
