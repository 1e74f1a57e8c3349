"""Rank 0's start: launch the followers, join the group, load this rank's share, and hand
back a PipelineModel, watching the followers all along (a rank that exits while the group
forms or loads is named at once instead of leaving rank 0 waiting)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from qwen3_chat.distributed.group import PipelineError
from qwen3_chat.distributed.hosts import Hostfile, model_digest
from qwen3_chat.distributed.launch import Cluster
from qwen3_chat.distributed.pipeline import PipelineModel
from qwen3_chat.distributed.runner import Runner
from qwen3_chat.distributed.tensor import TensorModel, choose_parallel
from qwen3_chat.distributed.worker import Joined, join
from qwen3_chat.errors import ModelLoadError
from qwen3_chat.files import read_json
from qwen3_chat.models import config_from_dict
from qwen3_chat.weights.loader import FLOAT_DTYPES, default_dtype

POLL_S = 0.2


@dataclass
class Distributed:
    model: PipelineModel
    cluster: Cluster
    parallel: str = "pipeline"  # what runs: pipeline or tensor
    note: str = ""  # why it is not what was asked, for the user

    def close(self) -> None:
        """Followers exit on EXIT; any that do not are terminated."""
        try:
            self.model.close()
        finally:
            self.cluster.stop()


def _dtype_name(dtype: mx.Dtype) -> str:
    return next(k for k, v in FLOAT_DTYPES.items() if v == dtype)


def open_distributed(hostfile: Hostfile, backend: str, path: Path, *, bits: int | None = None,
                     parallel: str = "auto") -> Distributed:  # fmt: skip
    """Start every rank of `hostfile` on the model folder `path` (present on every host);
    `parallel` is pipeline, tensor or auto (tensor where heads divide and RDMA is used)."""
    if len(hostfile.hosts) < 2:
        raise PipelineError("a hostfile for --hosts needs at least 2 hosts")
    if not model_digest(path):
        raise PipelineError(f"{path}: no model here (config.json missing)")
    config = config_from_dict(read_json(path / "config.json", error=ModelLoadError))
    mode, note = choose_parallel(parallel, config, len(hostfile.hosts), backend)
    dtype = default_dtype()
    cluster = Cluster.start(hostfile, backend, path, bits=bits, dtype=_dtype_name(dtype),
                            parallel=mode)  # fmt: skip
    runner = Runner()

    def start() -> Joined:
        group = mx.distributed.init(strict=True, backend=backend)
        if group.size() != len(hostfile.hosts):
            raise PipelineError(f"distributed: {group.size()} ranks joined, "
                                f"{len(hostfile.hosts)} expected")  # fmt: skip
        return join(group, path, model_digest(path), bits=bits, dtype=dtype,
                    names=hostfile.names, parallel=mode)  # fmt: skip

    try:
        pending = runner.submit(start)
        while True:
            try:
                done, joined = pending.wait(POLL_S)
            except RuntimeError as e:  # the ring lost a peer while forming or loading
                raise PipelineError(cluster.describe(e)) from None
            if done:
                break
            if cluster.dead():
                raise PipelineError(cluster.describe(None))
    except BaseException:
        cluster.stop()
        raise
    kind = TensorModel if mode == "tensor" else PipelineModel
    model = kind(joined.stage, joined.group, wire=dtype, describe=cluster.describe,
                 runner=runner)  # fmt: skip
    return Distributed(model, cluster, mode, note)
