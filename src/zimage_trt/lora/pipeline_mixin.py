"""diffusers' LoRA methods on `ZImageTRTPipeline`, with diffusers' names, arguments and semantics.

    pipe.load_lora_weights("style.safetensors", adapter_name="style")
    pipe.load_lora_weights("folder/", weight_name="character.safetensors", adapter_name="character")
    pipe.set_adapters(["style", "character"], adapter_weights=[0.8, 0.6])
    pipe.fuse_lora(lora_scale=0.9); ...; pipe.unfuse_lora()
    pipe.unload_lora_weights()   # the base weights again, bit for bit

Unlike diffusers (PEFT layers wrapped around each projection), the active adapters are always merged
into the weights (`lora/merge.py`), so the engines run unchanged: every method here ends with the
weights holding base + the active (and fused) adapters. `fuse_lora` therefore changes no speed; it
keeps diffusers' meaning: the adapters active at that moment, times `lora_scale`, stay in the weights
until `unfuse_lora`, and `unload_lora_weights` after it keeps them (the base becomes the fused model).
"""

from __future__ import annotations

import torch

from .adapters import LoraError, adapter_from_state_dict, read_state_dict
from .fp16_check import warn_if_out_of_range
from .merge import AdapterState, WeightMerger

COMPONENTS = ("transformer",)


class LoraPipelineMixin:
    """Needs from the pipeline: `transformer`, `dtype`, `_lock`, `_open_engines()`."""

    _lora_state: AdapterState | None = None
    _lora_merger: WeightMerger | None = None

    # -- loading ---------------------------------------------------------------------------------
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          hotswap: bool = False, **kwargs) -> None:
        """Load a LoRA for the transformer and make it the active adapter (weight 1), as diffusers does.

        A .safetensors file, a folder (with `weight_name=` when it holds several), a hub id, or a
        `{name: tensor}` dict; diffusers' key layouts and its conversions of other trainers' layouts.
        `hotswap=True` replaces the weights of an adapter already loaded under `adapter_name`.
        """
        weight_name = kwargs.pop("weight_name", None)
        kwargs.pop("low_cpu_mem_usage", None)  # (a PEFT-injection option: nothing is injected here)
        state_dict, metadata = read_state_dict(pretrained_model_name_or_path_or_dict, weight_name, **kwargs)
        with self._lock:
            state = self._lora()
            if adapter_name is None:
                adapter_name = _next_adapter_name(state.adapters)
            if not isinstance(adapter_name, str) or not adapter_name:
                raise LoraError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
            if hotswap and adapter_name not in state.adapters:
                raise LoraError(f"hotswap=True replaces an adapter already loaded; {adapter_name!r} is not "
                                f"(loaded: {sorted(state.adapters)})")
            if not hotswap and adapter_name in state.adapters:
                raise LoraError(f"adapter_name {adapter_name!r} is already in use (loaded: {sorted(state.adapters)});"
                                " pick another name, delete_adapters it first, or pass hotswap=True")
            adapter = adapter_from_state_dict(adapter_name, state_dict, metadata, self.transformer)
            if adapter_name in state.fused:
                raise LoraError(f"adapter {adapter_name!r} is fused: unfuse_lora() before hotswapping it")
            previous = state.adapters.get(adapter_name)
            state.adapters[adapter_name] = adapter
            active = state.active
            state.active = {adapter_name: 1.0}  # diffusers: the adapter just loaded is the one active
            try:
                self._lora_apply()
            except Exception:
                # Leave nothing half-done: the weights go back to what they held before this call.
                state.active = active
                if previous is None:
                    del state.adapters[adapter_name]
                else:
                    state.adapters[adapter_name] = previous
                self._lora_apply()
                raise

    # -- choosing --------------------------------------------------------------------------------
    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Activate these adapters with these weights (1.0 each by default); the others are inactive."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = list(adapter_weights)
        if len(weights) != len(names):
            raise LoraError(f"set_adapters: {len(names)} adapter names but {len(weights)} adapter_weights; give one "
                            "weight per adapter (or one number for all)")
        for w in weights:
            if isinstance(w, dict) or not isinstance(w, (int, float)) or isinstance(w, bool):
                raise LoraError(f"set_adapters: adapter weights are numbers (one per adapter); got {w!r} "
                                "(per-block weights are not supported: the adapters are merged per layer)")
        with self._lock:
            state = self._lora()
            unknown = [n for n in names if n not in state.adapters]
            if unknown:
                raise LoraError(f"set_adapters: no adapter named {unknown}; loaded: {sorted(state.adapters)}")
            state.active = {n: float(w) for n, w in zip(names, weights)}
            self._lora_apply()

    def get_active_adapters(self) -> list[str]:
        state = self._lora_state
        return [] if state is None or not state.enabled else list(state.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        state = self._lora_state
        return {"transformer": list(state.adapters)} if state is not None and state.adapters else {}

    def enable_lora(self) -> None:
        with self._lock:
            self._lora().enabled = True
            self._lora_apply()

    def disable_lora(self) -> None:
        """The base model's weights until `enable_lora` (adapters stay loaded)."""
        with self._lock:
            self._lora().enabled = False
            self._lora_apply()

    # -- fusing ----------------------------------------------------------------------------------
    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None, **_ignored) -> None:
        """Keep the active adapters (or `adapter_names`), times `lora_scale`, in the weights until unfuse_lora.

        `safe_fusing=True` refuses a fusion that makes a weight non-finite, as diffusers does.
        """
        _check_components(components)
        with self._lock:
            state = self._lora()
            chosen = state.active if adapter_names is None else {n: state.active.get(n, 1.0) for n in adapter_names}
            unknown = [n for n in chosen if n not in state.adapters]
            if unknown:
                raise LoraError(f"fuse_lora: no adapter named {unknown}; loaded: {sorted(state.adapters)}")
            fused = dict(state.fused)
            state.fused.update({n: w * float(lora_scale) for n, w in chosen.items()})
            self._lora_apply()
            if safe_fusing and not all(torch.isfinite(p).all() for p in self.transformer.parameters()):
                state.fused = fused
                self._lora_apply()
                raise LoraError("fuse_lora(safe_fusing=True): the fused weights hold NaN/inf; nothing was fused")

    def unfuse_lora(self, components: list[str] | None = None, **_ignored) -> None:
        _check_components(components)
        with self._lock:
            self._lora().fused = {}
            self._lora_apply()

    def enable_lora_hotswap(self, **_ignored) -> None:
        """Accepted for diffusers compatibility: here no adapter change ever recompiles an engine."""

    # -- removing --------------------------------------------------------------------------------
    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        with self._lock:
            state = self._lora()
            unknown = [n for n in names if n not in state.adapters]
            if unknown:
                raise LoraError(f"delete_adapters: no adapter named {unknown}; loaded: {sorted(state.adapters)}")
            fused = [n for n in names if n in state.fused]
            if fused:
                raise LoraError(f"delete_adapters: {fused} fused; unfuse_lora() first")
            for name in names:
                del state.adapters[name]
                state.active.pop(name, None)
            self._lora_apply()
            self._lora_release_if_empty()

    def unload_lora_weights(self) -> None:
        """Remove every adapter. Unfused adapters leave the weights bit for bit as they were; fused ones stay
        in them (diffusers' fuse -> unload workflow), and those weights become the base."""
        with self._lock:
            state = self._lora_state
            if state is None:
                return
            if state.fused:
                state.active, state.enabled = {}, True  # only the fused adapters stay in the weights
                self._lora_apply()
                self._lora_merger.bake(state.adapters)
            else:
                state.enabled = False
                self._lora_apply()
            self._lora_state = AdapterState()
            self._lora_release_if_empty()

    # -- internals -------------------------------------------------------------------------------
    def _lora(self) -> AdapterState:
        if self._lora_state is None:
            self._lora_state = AdapterState()
        if self._lora_merger is None:
            self._lora_merger = WeightMerger(self.transformer, self.dtype)
        return self._lora_state

    def _lora_apply(self) -> None:
        state = self._lora()
        engines = self._open_engines()
        changed = self._lora_merger.apply(state.contributions(), state.adapters, engines)
        if changed and self._lora_merger.applied:
            warn_if_out_of_range(self.transformer, engines, list(state.active) + list(state.fused))

    def _lora_release_if_empty(self) -> None:
        if self._lora_merger is not None and not self._lora_merger.applied:
            self._lora_merger.forget()

    def _lora_engine_opened(self, engine) -> None:
        """An engine opened after adapters were merged: one holding its own weights takes the merged ones."""
        merger, state = self._lora_merger, self._lora_state
        if merger is None or state is None or not merger.applied:
            return
        if getattr(engine, "holds_own_weights", False):
            engine.update_weights(merger.current_weights(state.adapters))
        warn_if_out_of_range(self.transformer, [engine], list(state.active) + list(state.fused))


def _check_components(components) -> None:
    if components is None:
        return
    extra = [c for c in ([components] if isinstance(components, str) else components) if c not in COMPONENTS]
    if extra:
        raise LoraError(f"LoRA applies to the transformer only here; components {extra} have no adapters")


def _next_adapter_name(adapters) -> str:
    # diffusers' default names: default_0, default_1, ...
    index = 0
    while f"default_{index}" in adapters:
        index += 1
    return f"default_{index}"
