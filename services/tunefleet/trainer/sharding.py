"""How the model's weights are held across the processes of a run, and gathered and restored for
checkpoints and the result.

`Replicated` (data parallelism, the default): every process holds the whole model and its
optimizer state; gradients are summed by `Distributed.sum_gradients`; the first process writes
checkpoints from its own copy.

`Sharded` (FSDP2, PyTorch's `fully_shard`, for bases that do not fit one GPU): each decoder layer
and then the whole model are sharded across all the run's processes, so each holds 1/world of the
parameters, gradients and optimizer state and gathers a layer's parameters only while it runs.
Gradients are reduce-scattered with their sum (not their mean, so that the loss normalised by
the tokens of every process gives the same update as one process on the combined batch).
Checkpoints and the result are gathered with torch.distributed.checkpoint's full state dicts
(every process takes part, the first one receives them on its CPU), and restored by broadcast
from the first process, which alone reads the files: the other nodes need no copy of them.
Every forward pass is collective, so every process evaluates, in step.
"""

from __future__ import annotations

from typing import Any

from tunefleet.trainer.distributed import Distributed


def trainable_names(model: Any) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


class Replicated:
    sharded = False

    def __init__(self, dist: Distributed) -> None:
        self.dist = dist

    def prepare(self, model: Any) -> Any:
        return model

    def gather(self, model: Any, optimizer: Any | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The trainable weights and the optimizer state (empty without an optimizer); called
        by the first process alone."""
        weights = {
            name: p.detach().cpu().clone()
            for name, p in model.named_parameters()
            if p.requires_grad
        }
        return weights, optimizer.state_dict() if optimizer is not None else {}

    def restore(
        self, model: Any, optimizer: Any | None, weights: dict[str, Any], state: dict[str, Any]
    ) -> None:
        """Copy `weights` (and `state` into the optimizer); called by every process that read
        the checkpoint."""
        import torch

        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                parameters[name].copy_(value)
        if optimizer is not None:
            optimizer.load_state_dict(state)

    def state_dict(self, model: Any) -> dict[str, Any] | None:
        """What `save_pretrained` saves: None, the model's own state."""
        return None

    def grad_norm(self, parameters: list[Any], max_norm: float) -> float:
        import torch

        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        norms = [p.grad.norm() for p in parameters if p.grad is not None]
        return float(torch.norm(torch.stack(norms)))


class Sharded(Replicated):
    sharded = True

    def prepare(self, model: Any) -> Any:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard
        from transformers.modeling_layers import GradientCheckpointingLayer

        mesh = init_device_mesh(self.dist.device.split(":")[0], (self.dist.world,))
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not layers:
            raise ValueError(f"{type(model).__name__} has no decoder layers FSDP can shard by")
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        # The root is the transformers model, inside PEFT's wrapper (which holds no parameters
        # of its own): generation calls it directly, and its hook gathers what no layer holds.
        root = model.get_base_model() if hasattr(model, "get_base_model") else model
        fully_shard(root, mesh=mesh)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # a sum, as the loss is normalised
                module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no other)
        return model

    def _options(self, **fields: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **fields)

    def gather(self, model: Any, optimizer: Any | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Collective: every process calls it; the first receives the full trainable weights
        and optimizer state (on its CPU), the others empty dicts."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = self._options(cpu_offload=True, ignore_frozen_params=True)
        weights = get_model_state_dict(model, options=options)
        # Tied weights appear under both names in a state dict: keep the parameter's own.
        names = trainable_names(model)
        weights = {name: value for name, value in weights.items() if name in names}
        state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer else {}
        return weights, state

    def state_dict(self, model: Any) -> dict[str, Any] | None:
        """Collective: the whole state dict, frozen weights too, on the first process's CPU
        (PEFT saves an adapted output layer's base weights with the adapter)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=self._options(cpu_offload=True))

    def restore(
        self, model: Any, optimizer: Any | None, weights: dict[str, Any], state: dict[str, Any]
    ) -> None:
        """Collective: the first process passes what it read, the others empty dicts."""
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = self._options(broadcast_from_rank0=True, strict=False)
        set_model_state_dict(model, weights, options=options)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state, options=options)

    def grad_norm(self, parameters: list[Any], max_norm: float) -> float:
        import torch
        from torch.distributed.tensor import DTensor

        # Clipping at infinity scales by 1: the norm of the sharded gradients, nothing changed.
        limit = max_norm if max_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(parameters, limit)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def for_run(dist: Distributed, fsdp: bool) -> Replicated:
    return Sharded(dist) if fsdp and dist.world > 1 else Replicated(dist)
