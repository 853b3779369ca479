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
