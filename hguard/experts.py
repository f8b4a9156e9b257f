"""Mixture-of-experts layers read as one wide MLP, so that the rest of hguard treats them as dense.

A routed experts module (transformers' `*Experts`: `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I],
called as experts(x [T, H], top_k_index [T, k], top_k_weights [T, k])) computes

    h_t = sum_e w_te * W_down[e] z_te,    z_te = act(gate_e x_t) * up_e x_t,

with w_te the routing weight of expert e for token t (zero where the token was not routed to e). That
is exactly a dense down projection W = [W_down[0] | ... | W_down[E-1]] ([H, E*I]) applied to the routed
neuron vector Z_t = (w_t0 z_t0, ..., w_t(E-1) z_t(E-1)) ([E*I], zero on the experts not chosen). So an
H-Neuron is (layer, e * I + i); its CETT is |Z_j| ||W_down[e][:, i]|| / ||h||, with the expert's own
down-projection column, the routing weight inside Z, and h the routed output; dampening Z_j scales that
neuron's contribution to the output. Shared experts (qwen2_moe's `shared_expert`, DeepSeek's) are dense
MLPs beside the routed ones: they are not read, and their output is not part of h.

`ExpertsDown` is that virtual down projection, one per experts module. It is never part of the model:
while a hook is on it (`hooks.hooked` enters `hguard_attached`), the experts module runs its own sparse
kernels as usual, then computes Z for the neurons the hooks read and passes it through
`ExpertsDown.forward`, where the hooks see it: a probe's neurons only, [B, S, k] in the probe's order
(one product with their gathered gate/up rows; `probe.BoundProbe` indexes them so), or identification's
all of them, [B, S, E*I] (expert by expert). It returns h plus whatever the hooks' scaling of Z changed. The experts' parent block is wrapped too, to learn the batch shape that the experts module
only sees flattened (flat.py's `TokenView`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .flat import TokenView


def is_experts(module: nn.Module) -> bool:
    """Whether `module` holds routed experts as 3-D `gate_up_proj` and `down_proj` parameters."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3


def check_layout(module: nn.Module) -> str | None:
    """None if the routed-neuron view can read `module`, else why not."""
    parameters = list(inspect.signature(type(module).forward).parameters)[1:]
    if len(parameters) < 3:
        return ("its experts module takes tokens already dispatched to experts, not (tokens, top-k experts, "
                "top-k weights)")
    if getattr(module, "has_post_expert_norm", False):
        return "its experts normalise their outputs, so the routed output is not linear in the neurons"
    if getattr(module, "has_gate", True) is False:
        return "its experts have no gate projection"
    if getattr(module, "has_bias", False) and getattr(module, "gate_up_proj_bias", None) is None:
        return "its experts declare a bias that they do not hold"
    return None


class ExpertsDown(TokenView):
    """The virtual down projection of one experts module: input Z [B, S, k live neurons or E*I], output h
    [B, S, H]."""

    def __init__(self, experts: nn.Module, block: nn.Module) -> None:
        super().__init__(experts, block)
        self.transposed = bool(getattr(experts, "is_transposed", False))
        self.concatenated = bool(getattr(experts, "is_concatenated", True))
        down = experts.down_proj  # [E, H, I], or [E, I, H] transposed
        self.num_experts = down.shape[0]
        self.width = down.shape[1] if self.transposed else down.shape[2]  # I: neurons per expert
        self.hidden = down.shape[2] if self.transposed else down.shape[1]
        self.live: torch.Tensor | None = None  # the neurons the hooks read; None: all
        self.attached = False
        self._routed: torch.Tensor | None = None  # h as the experts computed it, [B, S, H]
        self._z_live: torch.Tensor | None = None  # Z of the live neurons before any hook scaled them
        self._z: torch.Tensor | None = None  # the Z handed to the hooks, and its version then
        self._z_version = 0
        self._rows: dict[tuple, tuple] = {}  # one entry: the live neurons' gathered weights (`_selection`)

    @property
    def experts(self) -> nn.Module:
        return self.module

    @property
    def weight(self) -> torch.Tensor:
        """The experts' down projections (for device, dtype and placement checks)."""
        return self.experts.down_proj

    @property
    def intermediate_size(self) -> int:
        return self.num_experts * self.width

    # ---- weights ------------------------------------------------------------------------------
    def columns(self, neurons: torch.Tensor) -> torch.Tensor:
        """[H, k] the down-projection columns of the given flattened neurons (expert * I + i)."""
        down = self.experts.down_proj
        neurons = neurons.to(down.device)
        expert, index = neurons // self.width, neurons % self.width
        picked = down[expert, index] if self.transposed else down[expert, :, index]  # [k, H]
        return picked.t()

    def column_norms(self) -> torch.Tensor:
        """[E*I] ||W_down[e][:, i]|| of every neuron, fp32, in flattened order."""
        down = self.experts.down_proj.float()
        return torch.linalg.vector_norm(down, dim=2 if self.transposed else 1).flatten()

    def _positions(self, index: torch.Tensor) -> torch.Tensor:
        """[k, 2] where each neuron's gate and up outputs sit in its expert's gate_up output."""
        if self.concatenated:  # [gates..., ups...]
            return torch.stack((index, index + self.width), 1)
        return torch.stack((2 * index, 2 * index + 1), 1)  # interleaved: [gate0, up0, gate1, up1, ...]

    def _selection(self, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(gate/up rows [2k, H] in the layout `_apply_gate` reads, their bias [2k] or None, each neuron's
        expert [k], down-projection columns [H, k]) of the live neurons, cached per live set and version of
        the weights (an in-place change of them gathers again)."""
        weight = self.experts.gate_up_proj
        key = (live.data_ptr(), live.numel(), weight.data_ptr(), weight._version, self.experts.down_proj._version)
        if key not in self._rows:
            live = live.to(weight.device)
            expert, index = live // self.width, live % self.width
            positions = self._positions(index)
            experts = expert[:, None].expand_as(positions)
            rows = weight[experts, :, positions] if self.transposed else weight[experts, positions]  # [k, 2, H]
            bias = getattr(self.experts, "gate_up_proj_bias", None)
            bias = None if bias is None else bias[experts, positions]  # [k, 2]
            order = (1, 0) if self.concatenated else (0, 1)  # gates then ups, or pairs
            rows = rows.permute(*order, 2).reshape(-1, rows.shape[-1])
            bias = None if bias is None else bias.permute(*order).reshape(-1)
            self._rows = {key: (rows.detach(), None if bias is None else bias.detach(), expert,
                                self.columns(live).detach())}
        return self._rows[key]

    # ---- the routed neurons -------------------------------------------------------------------
    def _gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        apply = getattr(self.experts, "_apply_gate", None)
        if apply is not None:
            return apply(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.experts.act_fn(gate) * up

    def _routing(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[T, E] each token's weight on each expert (zero where not routed; index E marks a dropped slot)."""
        weights = torch.zeros(top_k_index.shape[0], self.num_experts + 1, dtype=dtype, device=top_k_index.device)
        weights.scatter_add_(1, top_k_index.long(), top_k_weights.to(dtype))
        return weights[:, : self.num_experts]

    def routed_neurons(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Z for tokens x [T, H]: of the live neurons only, in their order ([T, live]; a probe's terms index
        it so, probe.py), or of every neuron ([T, E*I]) where none are named."""
        if self.live is None:  # every neuron: one expert at a time
            routing = self._routing(top_k_index, top_k_weights, x.dtype)
            z = x.new_zeros(x.shape[0], self.intermediate_size)
            weight, bias = self.experts.gate_up_proj, getattr(self.experts, "gate_up_proj_bias", None)
            for e in range(self.num_experts):
                gate_up = x @ (weight[e] if self.transposed else weight[e].t())
                if bias is not None:
                    gate_up = gate_up + bias[e]
                z[:, e * self.width:(e + 1) * self.width] = self._gate(gate_up) * routing[:, e:e + 1]
            self._z_live = None
            return z
        rows, bias, expert, _ = self._selection(self.live)
        gate_up = x @ rows.t().to(x.dtype)
        if bias is not None:
            gate_up = gate_up + bias.to(x.dtype)
        # [T, live]: the routing weight of each live neuron's expert (zero where the token went elsewhere)
        weights = (top_k_weights[:, :, None].to(x.dtype) * (top_k_index[:, :, None] == expert)).sum(1)
        self._z_live = self._gate(gate_up) * weights
        return self._z_live.clone()  # the hooks may scale it in place; the unscaled values stay here

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """h [B, S, H]: the routed output, plus what a hook's change to the live neurons of Z adds (a hook
        that scaled them in place or passed another Z; all neurons' Z, identification's, is read only)."""
        if self._z_live is None or (z is self._z and self._z_version is not None and z._version == self._z_version):
            return self._routed  # (an inference tensor keeps no version: the change is computed, zero or not)
        changed = z.reshape(-1, z.shape[-1]) - self._z_live
        columns = self._selection(self.live)[3].to(changed.dtype)
        return self._routed + (changed @ columns.t()).view_as(self._routed)

    # ---- attaching ----------------------------------------------------------------------------
    def _through(self, inner, hidden_states, top_k_index, top_k_weights, *args, **kwargs) -> torch.Tensor:
        """The experts' forward while attached: theirs, then Z through the hooks on `forward`."""
        routed = inner(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        shape = self.batch_shape(hidden_states.shape[0])
        self._routed = routed.reshape(*shape, routed.shape[-1])
        z = self.routed_neurons(hidden_states, top_k_index, top_k_weights).view(*shape, -1)
        # a hook that scales Z in place moves its version (an inference-mode tensor has none)
        self._z, self._z_version = z, None if z.is_inference() else z._version
        return self.forward(z).reshape(routed.shape)

    @contextmanager
    def hguard_attached(self, live: torch.Tensor | None) -> Iterator[None]:
        """Route the experts module through this view for the block, computing Z for the `live` neurons
        (None: all), so that hooks on `forward` see Z and h. `hooks.hooked` enters it."""
        if self.attached:
            raise RuntimeError("this experts module is already being read by another hook block")
        self.live = None if live is None else live.to(self.experts.down_proj.device)
        self.attached = True
        try:
            with self.routed(self._through):
                yield
        finally:
            self.live, self._routed, self._z_live, self._z = None, None, None, None
            self.attached = False
