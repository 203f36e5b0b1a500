"""Making DeepSpeed's tensor-parallel all-reduce safe on CPU (gloo).

DeepSpeed 0.19 builds a shared-memory all-reduce op on every Linux host and AutoTP
uses it for inference. Its ``initialize()`` only sets up the shared buffer when
``LOCAL_SIZE`` equals the world size; torchrun sets ``LOCAL_WORLD_SIZE`` instead,
so every rank dies with SIGSEGV in ``inference_all_reduce_``. Even where it works it
spins forever when a peer dies, ignores the process-group timeout, and leaves a
64 MB file per rank in /dev/shm. DeepSpeed offers no switch for it (the build
variable is read at install time only), so we mark the op incompatible in the table
``build_shm_op`` consults: DeepSpeed then falls back to ``torch.distributed``'s
all-reduce over gloo, which honours timeouts and peer failures. Both steps are
explicit, logged, and verified after the process group exists.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)
SHM_OP = "deepspeed_shm_comm"


def use_process_group_all_reduce() -> None:
    """Call before ``deepspeed.init_distributed``: route AutoTP's all-reduce through gloo."""
    import deepspeed.comm as ds_comm
    import deepspeed.ops

    if ds_comm.is_initialized():
        raise RuntimeError("use_process_group_all_reduce() must run before init_distributed()")
    deepspeed.ops.__compatible_ops__[SHM_OP] = False
    log.info("DeepSpeed shared-memory all-reduce disabled: torch.distributed (gloo) all-reduce "
             "is used, so peer failures and timeouts are reported")


def verify_process_group_all_reduce() -> None:
    """Call after ``init_distributed``: fail loudly if the shared-memory op got in anyway."""
    import deepspeed.comm.comm as ds_comm_state
    import torch

    backend = getattr(ds_comm_state, "cdb", None)
    if getattr(backend, "shm_comm_op", None) is not None or (
            hasattr(torch.ops, "deepspeed") and hasattr(torch.ops.deepspeed,
                                                        "inference_all_reduce_")):
        raise RuntimeError("DeepSpeed's shared-memory all-reduce is active; it crashes under "
                           "torchrun (see mii_engines/deepspeed/cpu_allreduce.py)")
