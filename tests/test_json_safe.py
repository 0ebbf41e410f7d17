"""eva_rl.io.to_json_safe: the one sanitiser every JSON file of eva-rl goes through."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from eva_rl.io import to_json_safe


@dataclasses.dataclass
class Plain:
    betas: tuple = (0.9, 0.95)
    scale: float = math.inf


@dataclasses.dataclass
class WithToDict:
    lr: float = 1e-3

    def to_dict(self):
        return {"lr": self.lr, "from": "to_dict"}


def test_plain_json_types_from_numpy_torch_and_dataclasses():
    value = {
        1: np.float32(0.5), "arr": np.arange(3), "bool": np.bool_(True), "int": np.int64(7),
        "tensor": torch.tensor([1.5, 2.5]), "scalar": torch.tensor(3),
        "tuple": (1, (2, 3)), "nested": [{"x": np.array([[1.0, np.nan]])}],
        "nan": float("nan"), "inf": -math.inf, "ok": 0.25, "s": "text", "none": None,
        "plain": Plain(), "custom": WithToDict(),
    }
    out = to_json_safe(value)
    assert out == {
        "1": 0.5, "arr": [0, 1, 2], "bool": True, "int": 7, "tensor": [1.5, 2.5],
        "scalar": 3, "tuple": [1, [2, 3]], "nested": [{"x": [[1.0, None]]}], "nan": None,
        "inf": None, "ok": 0.25, "s": "text", "none": None,
        "plain": {"betas": [0.9, 0.95], "scale": None},
        "custom": {"lr": 1e-3, "from": "to_dict"},
    }
    assert type(out["int"]) is int and type(out["bool"]) is bool
    # standard JSON: no NaN/Infinity tokens
    json.dumps(out, allow_nan=False)


def test_unknown_types_are_left_for_json_to_reject():
    obj = object()
    assert to_json_safe(obj) is obj
    with pytest.raises(TypeError):
        json.dumps(to_json_safe({"x": obj}))
    assert to_json_safe(Plain) is Plain  # a dataclass type is not an instance
