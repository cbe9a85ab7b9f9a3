"""Payload codec: tensors and JSON go in as bytes and come back equal; nothing else goes in."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdxlpipe.cache_format import decode_json, decode_tensors, encode_json, encode_tensors


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_numpy_tensors_and_metadata_round_trip(dtype):
    latent = np.random.default_rng(0).standard_normal((4, 8, 8)).astype(dtype)
    data = encode_tensors({"latent": latent}, {"vae": "sdxl-vae-fp16-fix", "bucket": "1024x1024"})

    tensors, meta = decode_tensors(data)

    assert tensors["latent"].dtype == dtype
    np.testing.assert_array_equal(tensors["latent"], latent)
    assert meta == {"vae": "sdxl-vae-fp16-fix", "bucket": "1024x1024"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_torch_tensors_round_trip_as_torch(dtype):
    emb = torch.randn(2, 77, 16).to(dtype)[:, :5]  # a non-contiguous view
    data = encode_tensors({"emb": emb, "pooled": torch.ones(2, 4, dtype=dtype)}, {"k": "v"})

    tensors, meta = decode_tensors(data, framework="pt")

    assert torch.equal(tensors["emb"], emb)
    assert tensors["pooled"].dtype == dtype
    assert meta == {"k": "v"}


def test_torch_written_tensors_decode_as_numpy_and_mixed_inputs_work():
    data = encode_tensors({"a": torch.arange(3, dtype=torch.float16), "b": np.zeros(2, np.float32)})

    tensors, meta = decode_tensors(data, "np")

    np.testing.assert_array_equal(tensors["a"], np.arange(3, dtype=np.float16))
    assert tensors["b"].dtype == np.float32
    assert meta == {}


def test_anything_but_arrays_and_string_metadata_is_refused():
    with pytest.raises(TypeError, match="numpy arrays or torch tensors"):
        encode_tensors({"x": [1, 2, 3]})
    with pytest.raises(TypeError, match="str to str"):
        encode_tensors({"x": np.zeros(1)}, {"step": 3})
    with pytest.raises(ValueError, match="framework"):
        decode_tensors(encode_tensors({"x": np.zeros(1)}), framework="pickle")


def test_json_is_canonical():
    a = encode_json({"b": [1, 2], "a": "é"})
    b = encode_json({"a": "é", "b": [1, 2]})

    assert a == b == '{"a":"é","b":[1,2]}'.encode()
    assert decode_json(a) == {"a": "é", "b": [1, 2]}
    with pytest.raises(ValueError):
        encode_json({"x": float("nan")})


def test_importing_the_store_does_not_import_torch():
    code = (
        "import sys, sdxlpipe.cache_format as c; "
        "c.encode_tensors({'x': __import__('numpy').zeros(1)}); "
        "print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class _Planted:
    """Unpickling this creates a file: the evidence that a pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_payload_is_refused_and_never_executed(tmp_path):
    import pickle
    import struct

    marker = tmp_path / "executed"
    plain = pickle.dumps({"x": _Planted(marker)})
    buffer = io.BytesIO()
    torch.save({"x": torch.zeros(2), "planted": _Planted(marker)}, buffer)
    payloads = {
        "pickle": plain,
        "torch.save": buffer.getvalue(),
        # A plausible header length, so the pickle reaches the header parser.
        "pickle as header": struct.pack("<Q", len(plain)) + plain,
    }
    for name, payload in payloads.items():
        for framework in ("np", "pt"):
            with pytest.raises(ValueError):
                decode_tensors(payload, framework)
            assert not marker.exists(), f"{name} was unpickled"
    pickle.loads(plain)
    assert marker.exists()  # the planted object does execute when unpickled
