"""Multi-process training with ``torch.distributed``: data parallel (replicated values) and FSDP2.

Launch a script with ``torchrun --nproc_per_node=N script.py``; inside it,
:func:`init_from_env` joins the group (gloo on CPU, nccl on CUDA) and
:func:`shard_batch` gives each rank its share of the global batch.

- Data parallel: :func:`make_dist_train_step` (fixed support) and
  :func:`make_dist_spiel_step` wrap the single-process steps with :func:`sync_loss_fn`,
  which averages the values' gradients over ranks inside ``torch.func.grad``;
  :func:`score_distributed` reduces salience before selection. Supports are therefore
  chosen from global gradients and are identical on every rank.
- FSDP2: :func:`shard_with_deltas` shards the frozen base weights and the values per
  layer; :func:`make_fsdp_train_step` trains them with a sharded element-wise optimizer,
  :func:`make_fsdp_spiel_step` with SpIEL-AG (supports from global dense gradients).
- Checkpoints: :func:`save_checkpoint` / :func:`load_checkpoint` (safetensors + JSON, the
  one format of :mod:`spdelta.train.checkpoint`), resumable at another world size.

Example:
    >>> from spdelta.dist import init_from_env
    >>> init_from_env().world_size
    1
"""

from spdelta.dist._env import DistEnv, init_from_env, rank_and_world, shard_batch, shard_batches
from spdelta.dist._fsdp import (
    fsdp_delta,
    fsdp_init,
    make_fsdp_train_step,
    shard_with_deltas,
)
from spdelta.dist._fsdp_spiel import fsdp_spiel_init, make_fsdp_spiel_step
from spdelta.dist._steps import (
    DIST_METRICS,
    make_dist_spiel_step,
    make_dist_train_step,
    score_distributed,
)
from spdelta.dist._sync import (
    all_reduce_mean,
    all_reduce_sum,
    assert_replicated,
    broadcast_tree,
    sync_grads,
    sync_loss_fn,
)
from spdelta.train.checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "DIST_METRICS",
    "DistEnv",
    "all_reduce_mean",
    "all_reduce_sum",
    "assert_replicated",
    "broadcast_tree",
    "fsdp_delta",
    "fsdp_init",
    "fsdp_spiel_init",
    "init_from_env",
    "load_checkpoint",
    "make_dist_spiel_step",
    "make_dist_train_step",
    "make_fsdp_spiel_step",
    "make_fsdp_train_step",
    "rank_and_world",
    "save_checkpoint",
    "score_distributed",
    "shard_batch",
    "shard_batches",
    "shard_with_deltas",
    "sync_grads",
    "sync_loss_fn",
]
