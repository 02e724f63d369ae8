"""A PyTorch module that looks embeddings up in an hps server, with HugeCTR HPS's Torch plugin API.

One Lookup RPC per forward; the result lands on the keys' device. Inference only: it holds no parameters and
carries no gradient. Import it explicitly: `import hps_client` does not import torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hps_client import endpoint


class LookupLayer(torch.nn.Module):
    """Dense lookup like `hps_torch.LookupLayer`: int64 keys of any shape -> keys.shape + (emb_vec_size,).

    The server is `address` if given, else the one `ps_config_file` (HPS ps.json or hps YAML) implies.
    `table_id` indexes the model's tables in the server's order. Keys no level holds get the table's
    default vector. Output is float32.
    """

    def __init__(
        self,
        ps_config_file: str | Path | None = None,
        model_name: str = "",
        table_id: int = 0,
        emb_vec_size: int = 0,
        *,
        address: str | None = None,
    ) -> None:
        super().__init__()
        target = endpoint.resolve_address(ps_config_file, address)
        if target is None:
            raise ValueError("LookupLayer: give ps_config_file or address")
        if not model_name:
            raise ValueError("model_name: required")
        if int(emb_vec_size) < 1:
            raise ValueError(f"emb_vec_size: must be >= 1, got {emb_vec_size}")
        self.address = target
        self.model_name = model_name
        self.table_id = int(table_id)
        self.emb_vec_size = int(emb_vec_size)

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        if keys.dtype.is_floating_point or keys.dtype.is_complex or keys.dtype == torch.bool:
            raise TypeError(f"keys: must be integers, got {keys.dtype}")
        ref = endpoint.table_ref(self.address, self.model_name, self.table_id, self.emb_vec_size)
        host_keys = keys.detach().to("cpu", torch.int64).numpy()
        vectors = endpoint.shared_client(self.address).lookup(ref.model, ref.table, host_keys)
        # The reply is a read-only view of the received bytes; torch wants memory it may write.
        out = torch.from_numpy(np.array(vectors))
        return out if keys.device.type == "cpu" else out.to(keys.device)

    def extra_repr(self) -> str:
        return f"address={self.address!r}, model_name={self.model_name!r}, table_id={self.table_id}, " + (
            f"emb_vec_size={self.emb_vec_size}"
        )
