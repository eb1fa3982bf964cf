"""Adapters merged into the transformer's own weights, in place, and restored exactly.

Engines keep running without a rebuild or a recompile:

- eager and torch-compiled engines run the transformer's own parameters, so a layer's weight is
  overwritten in place (`copy_`: same storage, so compiled graphs and captured CUDA graphs see it);
- FP8 layers (`Fp8Linear`) are quantised again, scales recomputed, on the layer's device, from the
  merged 16-bit weight;
- engines holding their own copy of the weights (TensorRT) get the merged weights of the changed
  layers through `engine.update_weights` (a refit), under diffusers' state-dict names.

A layer's weight is always recomputed from its base, never updated incrementally:
W = W0 + sum_i c_i * B_i @ A_i in float32, then cast; a layer with no contribution gets W0 back bit
for bit. The base W0 of each touched layer is kept:

- a 16-bit layer's W0 is a copy on the layer's own device (switching is a copy and a few small
  matmuls per layer, no transfer);
- an FP8 layer no longer has its 16-bit weight anywhere, and the FP8 one is not the base (quantised),
  so W0 is read once from the model folder's safetensors (`transformer.config._name_or_path`), cast
  as the pipeline loaded it, and kept in CPU memory (pinned when CUDA is there): FP8 is chosen to save
  GPU memory, a 16-bit copy there would undo that, and re-reading the files at every switch would
  cost more than copying from pinned memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..model.fp8 import Fp8Linear
from ..model.weights import WeightsError, read_transformer_tensors
from .adapters import Adapter, LoraError

# A layer's contribution list: ((adapter name, adapter serial, coefficient), ...), coefficient = weight x scale.
Contributions = tuple[tuple[str, int, float], ...]


@dataclass
class AdapterState:
    """Which adapters exist, which are active with what weight, what is fused (diffusers' semantics)."""

    adapters: dict[str, Adapter] = field(default_factory=dict)
    active: dict[str, float] = field(default_factory=dict)  # adapter -> weight (set_adapters)
    fused: dict[str, float] = field(default_factory=dict)  # adapter -> weight x lora_scale (fuse_lora)
    enabled: bool = True

    def contributions(self) -> dict[str, Contributions]:
        """Per layer: the (adapter, coefficient) pairs its weight must hold now."""
        if not self.enabled:
            return {}
        terms: dict[str, list[tuple[str, float]]] = {}
        # Fused adapters stay in the weights until unfuse_lora; active ones not fused come on top.
        wanted = {**{n: w for n, w in self.active.items() if n not in self.fused}, **self.fused}
        for name, weight in wanted.items():
            for module, layer in self.adapters[name].layers.items():
                coefficient = float(weight) * layer.scale
                if coefficient != 0.0:  # (the serial tells a hotswapped adapter from the one it replaced)
                    terms.setdefault(module, []).append((name, self.adapters[name].serial, coefficient))
        return {m: tuple(sorted(t)) for m, t in terms.items()}


class WeightMerger:
    """Writes merged weights into the transformer (and into engines holding their own copy)."""

    def __init__(self, transformer: nn.Module, dtype: torch.dtype):
        self.transformer = transformer
        self.dtype = dtype  # the pipeline's 16-bit (or fp32) dtype: FP8 layers' base weights are read in it
        self.base: dict[str, torch.Tensor] = {}  # module -> W0
        self.applied: dict[str, Contributions] = {}  # module -> what its weight holds now (absent: W0)

    # -- base weights ----------------------------------------------------------------------------
    def _module(self, name: str) -> nn.Module:
        return self.transformer.get_submodule(name)

    def keep_base(self, names) -> None:
        """Remember W0 for every layer in `names` not yet remembered (before anything is written)."""
        from_folder = []
        for name in sorted(set(names) - set(self.base)):
            module = self._module(name)
            if isinstance(module, Fp8Linear):
                from_folder.append(name)
            else:
                self.base[name] = module.weight.detach().clone()
        if from_folder:
            self.base.update(self._read_fp8_bases(from_folder))

    def _read_fp8_bases(self, names: list[str]) -> dict[str, torch.Tensor]:
        folder = getattr(self.transformer.config, "_name_or_path", None)
        if not folder or not Path(folder).is_dir():
            raise LoraError(
                f"the FP8 layers {names[:3]} keep no 16-bit weights, and LoRA on FP8 reads the touched layers' "
                f"16-bit weights from the model's diffusers-format folder, and this transformer records none (it "
                f"came from {folder or 'memory'!r}); load the pipeline with ZImageTRTPipeline.from_pretrained(folder, "
                "precision='fp8') (a single-file checkpoint: save its transformer once with save_pretrained)")
        try:
            tensors = read_transformer_tensors(folder, [f"{n}.weight" for n in names], self.dtype)
        except WeightsError as error:
            raise LoraError(f"cannot read the 16-bit weights of FP8 layers for the LoRA: {error}") from error
        pin = torch.cuda.is_available()
        return {n: tensors[f"{n}.weight"].pin_memory() if pin else tensors[f"{n}.weight"] for n in names}

    # -- merging ---------------------------------------------------------------------------------
    def target(self, name: str, contributions: Contributions, adapters: dict[str, Adapter]) -> torch.Tensor:
        """W0 + sum c_i B_i A_i (float32, then the base's dtype) on the layer's device; W0 itself when empty."""
        module = self._module(name)
        device = module.weight_fp8.device if isinstance(module, Fp8Linear) else module.weight.device
        base = self.base[name]
        if not contributions:
            return base.to(device, non_blocking=True)
        # Moved first, then widened on the device (a copy: never the kept base itself).
        merged = base.to(device, non_blocking=True).to(torch.float32, copy=True)
        for adapter, _serial, coefficient in contributions:
            layer = adapters[adapter].layers[name]
            merged.addmm_(layer.up.to(device, torch.float32), layer.down.to(device, torch.float32), alpha=coefficient)
        return merged.to(base.dtype)

    @torch.no_grad()
    def apply(self, wanted: dict[str, Contributions], adapters: dict[str, Adapter], engines=()) -> list[str]:
        """Bring every layer to `wanted` (absent = W0); returns the layers written."""
        changed = sorted(n for n in set(wanted) | set(self.applied) if wanted.get(n, ()) != self.applied.get(n, ()))
        self.keep_base(changed)
        refits = {}
        holders = [e for e in engines if getattr(e, "holds_own_weights", False)]
        for name in changed:
            weight = self.target(name, wanted.get(name, ()), adapters)
            module = self._module(name)
            if isinstance(module, Fp8Linear):
                module.set_weight(weight)
            else:
                module.weight.copy_(weight)
            if holders:  # (a 16-bit layer's own parameter now holds the merged weight: no second copy)
                refits[f"{name}.weight"] = weight if isinstance(module, Fp8Linear) else module.weight.detach()
            if wanted.get(name):
                self.applied[name] = wanted[name]
            else:
                self.applied.pop(name, None)
        for engine in holders:
            if refits:
                engine.update_weights(refits)
        return changed

    def current_weights(self, adapters: dict[str, Adapter]) -> dict[str, torch.Tensor]:
        """The merged weight of every layer that differs from its base (for an engine opened later)."""
        out = {}
        for name, contributions in sorted(self.applied.items()):
            module = self._module(name)
            out[f"{name}.weight"] = self.target(name, contributions, adapters) if isinstance(module, Fp8Linear) \
                else module.weight.detach()
        return out

    def bake(self, adapters: dict[str, Adapter]) -> None:
        """Make the current weights the new base (diffusers: fuse_lora then unload_lora_weights keeps the
        fused adapters). 16-bit layers hold them already; FP8 layers keep their merged 16-bit base."""
        fp8 = [n for n in self.base if isinstance(self._module(n), Fp8Linear)]
        baked = {n: self.target(n, self.applied.get(n, ()), adapters).cpu() for n in fp8}
        pin = torch.cuda.is_available()
        self.base = {n: w.pin_memory() if pin else w for n, w in baked.items()}
        self.applied = {}

    def forget(self) -> None:
        """Drop the 16-bit layers' kept base weights once every layer holds its base again (FP8 layers keep
        theirs: they may differ from the folder after a bake, and reading them again costs a file read)."""
        if self.applied:
            raise RuntimeError("cannot forget the base weights while adapters are merged")
        self.base = {n: w for n, w in self.base.items() if isinstance(self._module(n), Fp8Linear)}
