"""What a set of weights weighs on the wire: the one byte count behind a site's
``bytes_sent``/``bytes_received``, the server's global-model ``bytes`` and a quantized
message's size."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch


def tensor_bytes(state: Mapping[str, Any]) -> int:
    """Bytes of the tensors (torch or numpy) among ``state``'s values: elements × dtype
    size, as they travel. Other values (a quantizer's block size or dtype name) count 0."""
    return sum(int(v.nbytes) for v in state.values() if isinstance(v, (torch.Tensor, np.ndarray)))


# safetensors' dtype names (its format's spec) and torch's
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_header(path: str, f=None) -> tuple[dict, int]:
    """The tensor entries of the safetensors file ``path`` (name -> dtype, shape, data
    offsets; in the header's order, ``__metadata__`` left out) and where their data starts,
    without reading a tensor. Raises ValueError naming the file when it is not one."""
    import json
    import struct

    if f is None:
        with open(path, "rb", buffering=0) as opened:
            return safetensors_header(path, opened)
    head = f.read(8)
    if len(head) != 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", head)
    try:
        header = json.loads(f.read(header_len))
    except ValueError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + header_len


def read_safetensors(path: str, into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``, read with plain reads into tensors of
    their own: one copy of the weights in memory and nothing else. (safetensors' own loader
    maps the file: the pages it touches count in the process's resident memory beside the
    tensors made from them until the map is closed, a second copy of the model at its peak.)

    ``into``: tensors to read the file's into, name by name, in place (same shapes; a
    tensor of another dtype is read and cast one tensor at a time). Raises ValueError
    naming the file when it is not a safetensors file or ``into`` does not match it."""
    with open(path, "rb", buffering=0) as f:
        header, start = safetensors_header(path, f)
        # in file order: the reads go forward
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        if into is not None and set(header) != set(into):
            missing, extra = sorted(set(into) - set(header)), sorted(set(header) - set(into))
            raise ValueError(f"{path}: its tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        out: dict[str, torch.Tensor] = {}
        for name, entry in entries:
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which fedllm does not read")
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            target = None if into is None else into[name]
            if target is not None and tuple(target.shape) != shape:
                raise ValueError(f"{path}: tensor {name!r} has shape {shape}, the model's is {tuple(target.shape)}")
            tensor = target if target is not None and target.dtype == dtype and target.is_contiguous() else torch.empty(shape, dtype=dtype)
            if tensor.numel() * tensor.element_size() != end - begin:
                raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes, {shape} {entry['dtype']} needs "
                                 f"{tensor.numel() * tensor.element_size()}")
            f.seek(start + begin)
            view = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"{path}: file ends inside tensor {name!r}")
                got += n
            if target is not None and tensor is not target:
                target.copy_(tensor)
                tensor = target
            out[name] = tensor
        return {name: out[name] for name in header}
