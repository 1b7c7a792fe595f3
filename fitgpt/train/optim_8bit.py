"""AdamW with 8-bit block-wise moments (`memory.optimizer_state = "8bit"`): bitsandbytes' AdamW8bit.

bitsandbytes (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization") keeps each
moment of a tensor of at least 4096 elements as uint8 codes of a dynamic (exponent + fraction)
map, one fp32 absmax per block of 256 elements; smaller tensors keep fp32 moments. On CUDA its
fused kernel updates a tensor in one pass. `fitgpt.planner.optstate` counts these bytes.

One thing is fitgpt's own: the step on the CPU. bitsandbytes' CPU kernel is a single custom
operator, opaque to the storage tracker (a dispatch mode sees its outputs, not the fp32 tensors
it dequantises into), so the CPU's peak could not be measured. `AdamW8bit._update_cpu` performs
the same arithmetic in the same order with PyTorch operators around bitsandbytes' own block-wise
(de)quantisation operators, so every temporary is visible; tests/test_optim_state.py checks that
it reproduces bitsandbytes' CPU kernel bit for bit. CUDA uses bitsandbytes unchanged.
"""

from __future__ import annotations

import logging
import math

import torch

_log = logging.getLogger("bitsandbytes")
_level = _log.level
_log.setLevel(logging.ERROR)  # its CPU backend warns at import about an optional 4-bit GEMM kernel
try:
    import bitsandbytes as bnb
finally:
    _log.setLevel(_level)

BLOCK = 256  # bitsandbytes' block size for block-wise optimizer state (fitgpt.planner.optstate)

__all__ = ["AdamW8bit", "bnb"]


class AdamW8bit(bnb.optim.AdamW8bit):
    """bitsandbytes' AdamW8bit, with its CPU step written out in visible PyTorch operators."""

    @torch.no_grad()
    def update_step(self, group, p, gindex, pindex):
        if p.device.type != "cpu":
            return super().update_step(group, p, gindex, pindex)
        state = self.state[p]
        state["step"] += 1
        config = self.get_config(gindex, pindex, group)
        if state["state1"].dtype == torch.uint8:
            self._update_cpu_8bit(p, state, config)
        else:
            self._update_cpu_32bit(p, state, config)

    @staticmethod
    def _update_cpu_8bit(p, state, config) -> None:
        """bitsandbytes' `_optimizer_update_8bit_blockwise_cpu` (adam), operator by operator:
        dequantise both moments to fp32, update them and the weight, quantise them back."""
        ops = torch.ops.bitsandbytes
        beta1, beta2 = config["betas"][0], config["betas"][1]
        lr, eps, wd, step = config["lr"], config["eps"], config["weight_decay"], state["step"]
        m = ops.dequantize_blockwise(state["state1"], state["absmax1"], state["qmap1"], BLOCK, torch.float32)
        v = ops.dequantize_blockwise(state["state2"], state["absmax2"], state["qmap2"], BLOCK, torch.float32)
        g = p.grad.float()
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        denom = v.sqrt().div_(correction2).add_(eps)
        w = p.data.float()  # p itself in fp32
        if wd > 0.0:
            w.mul_(1.0 - lr * wd)
        w.addcdiv_(m, denom, value=-lr / correction1)
        if w is not p.data:
            p.data.copy_(w)
        del denom, w
        for moment, key in ((m, "1"), (v, "2")):
            codes, absmax = ops.quantize_blockwise(moment, state[f"qmap{key}"], BLOCK)
            state[f"state{key}"].copy_(codes)
            state[f"absmax{key}"].copy_(absmax)
            del codes, absmax

    @staticmethod
    def _update_cpu_32bit(p, state, config) -> None:
        """bitsandbytes' `_optimizer_update_32bit_cpu` (adam) for the small tensors that keep
        fp32 moments."""
        beta1, beta2 = config["betas"][0], config["betas"][1]
        lr, eps, wd, step = config["lr"], config["eps"], config["weight_decay"], state["step"]
        m, v, g = state["state1"], state["state2"], p.grad.float()
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        w = p.data.float()
        if wd > 0.0:
            w.mul_(1.0 - lr * wd)
        update = m / (v.sqrt() + eps * correction2)
        w.add_(update, alpha=-lr * correction2 / correction1)
        if w is not p.data:
            p.data.copy_(w)

    def load_state_dict(self, state_dict, move_to_device=True):
        """bitsandbytes' load, then every tensor's maps pointed at the optimizer's one shared
        pair again (a checkpoint may hold a copy per tensor: the plan counts one pair)."""
        super().load_state_dict(state_dict, move_to_device=move_to_device)
        shared: dict[tuple, torch.Tensor] = {}
        for st in self.state.values():
            for key in ("qmap1", "qmap2"):
                q = st.get(key)
                if isinstance(q, torch.Tensor):
                    ident = (key, q.device, q.cpu().numpy().tobytes())
                    st[key] = shared.setdefault(ident, q)
