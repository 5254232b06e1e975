"""Undoing an adapter's injection: PEFT's loaders inject an adapter before they read its file, so a file refused
afterwards must put the model back as it was before the loader ran.

The tuner keeps, per adapter, the state from before its injection until the adapter's first state dict reaches the
load hook (`remember_injection` / `take_injection`); loading into an adapter the caller already holds drops it first.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, delete_adapter
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .versions import tensor_version

_PENDING = "_state_before_injection"  # on the tuner: adapter name -> ModelState


def remember_injection(tuner: BaseTuner, state: ModelState) -> None:
    vars(tuner).setdefault(_PENDING, {})[state.adapter_name] = state


def take_injection(tuner: object, adapter_name: str) -> ModelState | None:
    """The state from before `adapter_name` was injected, if no state dict was loaded into it since; forgotten."""
    return vars(tuner).get(_PENDING, {}).pop(adapter_name, None) if isinstance(tuner, BaseTuner) else None


class ModelState:
    """What injecting `adapter_name` may change in a model, to put back when it fails or its first state dict is
    refused: the module tree (SPU layers and `modules_to_save` wrappers replace modules), `requires_grad` flags,
    adapters and active adapter. `injected` notes the adapter's tensors as the injection left them: once trained,
    selected or loaded (a tensor replaced or changed in place), the adapter is the user's and is never undone. The
    note holds those tensors weakly: a selection replaces the support, and the note must not keep the injection's
    support alive beside it (a whole copy of every target's positions, for as long as the model lives)."""

    def __init__(self, tuner: BaseTuner, model: nn.Module, adapter_name: str) -> None:
        self.tuner, self.model, self.adapter_name = tuner, model, adapter_name
        self.modules = list(model.named_modules(remove_duplicate=False))
        self.requires_grad = {parameter: parameter.requires_grad for parameter in model.parameters()}
        self.targeted = list(tuner.targeted_module_names)
        self.had_peft_config = "peft_config" in vars(model)
        self.versions: list[tuple[weakref.ref[torch.Tensor], int]] = []

    def injected(self) -> ModelState:
        """Keep only what the injection changed (so a note kept for long holds no module a later change let go of),
        and the adapter's tensors as it left them."""
        now = dict(self.model.named_modules(remove_duplicate=False))
        self.modules = [(path, module) for path, module in self.modules if now.get(path) is not module]
        self.requires_grad = {p: flag for p, flag in self.requires_grad.items() if p.requires_grad != flag}
        self.versions = [(weakref.ref(tensor), version) for tensor, version in self._adapter_tensors()]
        return self

    def __getstate__(self) -> dict:
        """The note as `pickle` and `copy.deepcopy` take it (`torch.save(model)`; weak references do not pickle): each
        noted tensor still as the injection left it, None for one freed or changed. The alive ones are the model's, so
        a copy's note judges the copy's tensors, from their versions as the copy starts."""
        state = dict(vars(self))
        state["versions"] = [
            (tensor if tensor is not None and tensor_version(tensor) == version else None)
            for tensor, version in ((noted(), version) for noted, version in self.versions)
        ]
        return state

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self.versions = [(_freed, -1) if t is None else (weakref.ref(t), tensor_version(t)) for t in state["versions"]]

    def untouched(self) -> bool:
        now = self._adapter_tensors()
        return len(now) == len(self.versions) and all(
            tensor is noted() and u == v for (tensor, u), (noted, v) in zip(now, self.versions, strict=True)
        )

    def _adapter_tensors(self) -> list[tuple[torch.Tensor, int]]:
        named = itertools.chain(self.model.named_parameters(), self.model.named_buffers())
        return [(tensor, tensor_version(tensor)) for name, tensor in named if f".{self.adapter_name}." in f"{name}."]

    def restore(self) -> None:
        """Undo the injection, and only it: the adapter leaves every layer and wrapper, and a module it replaced gets
        its original back unless another adapter lives in it now. What happened since (adapters added into the same
        modules, `set_adapter`) stays: putting the noted snapshot back whole would silently strip a later adapter's
        layers and switch the active adapter."""
        name = self.adapter_name
        self.tuner.peft_config.pop(name, None)
        active = self.tuner.active_adapter
        active = [active] if isinstance(active, str) else list(active)
        chosen = delete_adapter(self.model, name, prefix=self.tuner.prefix, layer_cls=self.tuner.tuner_layer_cls)
        others = [note for note in vars(self.tuner).get(_PENDING, {}).values() if note is not self]
        for path, module in self.modules:  # parents come before their children
            if path:
                parent_path, _, child = path.rpartition(".")
                parent = self.model.get_submodule(parent_path)
                current = getattr(parent, child, None)
                if current is module:
                    continue
                if _holds_adapters(current):
                    self._hand_over_module(others, path, module, current)
                else:
                    setattr(parent, child, module)
        if name in active:  # the layers picked the next active adapters as PEFT's deletion does; none if none is left
            kept = [n for n in active if n != name] or [n for n in chosen or [] if n in self.tuner.peft_config]
            self.tuner.active_adapter = kept
        self.tuner.targeted_module_names[:] = [
            target
            for target in self.tuner.targeted_module_names
            if target in self.targeted or _holds_adapters(_submodule(self.model, target))
        ]
        if not self.had_peft_config and self.tuner.peft_config:
            # the first adapter froze the base; the adapters added since keep it frozen, and the last one thaws it
            for note in others:
                note.had_peft_config = False
                for parameter, flag in self.requires_grad.items():
                    note.requires_grad.setdefault(parameter, flag)
            return
        for parameter, flag in self.requires_grad.items():
            parameter.requires_grad = flag
        if not self.had_peft_config and "peft_config" in vars(self.model):
            del self.model.peft_config

    def _hand_over_module(self, others: list[ModelState], path: str, original: nn.Module, kept: nn.Module) -> None:
        """A module kept for the adapters living in it now: the pending notes of those adapters take over putting the
        original back (and its target name), so undoing the last of them still leaves the base as it was."""
        for note in others:
            if note.adapter_name in _adapter_names(kept):
                if all(noted_path != path for noted_path, _ in note.modules):
                    note.modules = sorted([*note.modules, (path, original)], key=lambda item: item[0].count("."))
                if path not in self.targeted and path in note.targeted:
                    note.targeted.remove(path)


def _adapter_names(module: nn.Module | None) -> set[str]:
    """The adapters living in a tuner layer or a `modules_to_save` wrapper (none for any other module)."""
    if isinstance(module, BaseTunerLayer):
        return set(module._all_available_adapter_names())
    if isinstance(module, AuxiliaryTrainingWrapper):
        return set(module._adapters)
    return set()


def _holds_adapters(module: nn.Module | None) -> bool:
    return bool(_adapter_names(module))


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _freed() -> None:
    """A noted tensor freed or changed before the note was copied: it stands for a reference that has died."""
    return None
