"""The one byte counter against an independent reference: the data section of a safetensors file."""

from __future__ import annotations

import json
import struct

from safetensors.torch import save_model

from lmscope.compress import Quantize, compress
from lmscope.compress.size import state_bytes


def _safetensors_data_bytes(path) -> int:
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    return sum(
        end - start for k, v in header.items() if k != "__metadata__" for start, end in [v["data_offsets"]]
    )


def test_state_bytes_equals_what_safetensors_stores(make_tiny, tmp_path):
    for family in ("llama", "gpt2"):  # tied embedding / LM head: counted once, as safetensors stores it
        lm = make_tiny(family)
        save_model(lm.model, str(tmp_path / f"{family}.safetensors"))
        assert state_bytes(lm.model) == _safetensors_data_bytes(tmp_path / f"{family}.safetensors")


def test_compress_reports_the_same_bytes(make_tiny, tmp_path):
    res = compress(make_tiny("llama"), Quantize("int8"))
    assert res.bytes_after == state_bytes(res.lm.model) < res.bytes_before
