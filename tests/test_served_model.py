"""The checkpoint a server serves: reported state, clear failures, reload when replaced."""

from __future__ import annotations

import os

import pytest
import torch

from segany_pet.label.models import ModelUnavailableError, ServedModel
from segany_pet.model import build_model, save_checkpoint


def test_missing_file_is_an_error_in_info_and_a_503_that_says_what_to_do(tmp_path):
    served = ServedModel(tmp_path / "absent.pt")
    with pytest.raises(ModelUnavailableError, match="does not exist") as error:
        served.predictor()
    assert error.value.status_code == 503
    record = served.describe()
    assert record["state"] == "error" and "absent.pt" in record["error"]


def test_broken_file_is_reported_not_replaced_by_random_weights(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"definitely not a checkpoint")
    served = ServedModel(path)
    with pytest.raises(ModelUnavailableError):
        served.predictor()
    assert served.describe()["state"] == "error"


def test_a_replaced_checkpoint_is_loaded_on_the_next_request(tmp_path):
    path = tmp_path / "model.pt"
    torch.manual_seed(0)
    save_checkpoint(build_model("segany_pet_small"), path)
    served = ServedModel(path)
    first = served.predictor()
    assert served.predictor() is first
    assert served.describe() | {"file": None} == {
        "file": None, "state": "ready", "preset": "segany_pet_small", "inference_dtype": "float32",
        "crop_spacings_mm": [1.5, 1.25], "embedding_cache_crops": 606,  # 2048 MB of 3.375 MiB embeddings
    }

    torch.manual_seed(1)
    save_checkpoint(build_model("segany_pet_small"), path)
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))
    second = served.predictor()
    assert second is not first
    old, new = first.model.state_dict(), second.model.state_dict()
    assert any(not torch.equal(old[key], new[key]) for key in old)


def test_a_published_model_is_served_while_it_exists(tmp_path):
    configured, published = tmp_path / "shipped.pt", tmp_path / "state" / "published.pt"
    save_checkpoint(build_model("segany_pet_small"), configured)
    served = ServedModel(configured, published=published)
    shipped = served.predictor()
    assert served.describe()["file"] == str(configured)

    published.parent.mkdir()
    save_checkpoint(build_model("segany_pet_small"), published)
    trained = served.predictor()
    assert trained is not shipped
    record = served.describe()
    assert record["file"] == str(published) and record["configured_file"] == str(configured)

    published.unlink()  # the admin removes the trained model: the configured one is served again
    assert served.predictor() is not trained and served.describe()["file"] == str(configured)
