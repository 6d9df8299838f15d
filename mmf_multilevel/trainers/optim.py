"""One optimizer made of several: for a method whose parameter groups need different algorithms
(SOHO: SGD for the CNN, AdamW for the transformer) under one learning-rate schedule.

:class:`CompositeOptimizer` is a ``torch.optim.Optimizer`` whose ``param_groups`` are the very group
dicts of its parts, so MMF's (or torch's) schedulers, gradient clipping and the trainer see one
optimizer; ``step`` / ``zero_grad`` run every part; ``state_dict`` holds each part's state by name, so
a checkpoint resumes every part exactly. A method returns one from its ``configure_optimizer`` hook.
"""
from typing import Dict

import torch

__all__ = ["CompositeOptimizer"]


class CompositeOptimizer(torch.optim.Optimizer):
    def __init__(self, parts: Dict[str, torch.optim.Optimizer]):
        if not parts:
            raise ValueError("CompositeOptimizer needs at least one optimizer")
        seen = set()
        for name, part in parts.items():
            for group in part.param_groups:
                for param in group["params"]:
                    if id(param) in seen:
                        raise ValueError(f"a parameter is in more than one part (again in '{name}')")
                    seen.add(id(param))
        self.parts = dict(parts)
        # torch's base class keeps its own copies of the groups; ours are the parts' own dicts, so a
        # scheduler setting group["lr"] here sets it in the part that steps with it
        super().__init__([p for part in self.parts.values() for g in part.param_groups for p in g["params"]], {})
        self.param_groups = [group for part in self.parts.values() for group in part.param_groups]

    @property
    def state(self):
        merged = {}
        for part in self.parts.values():
            merged.update(part.state)
        return merged

    @state.setter
    def state(self, value):  # set (empty) by torch's base class constructor; the parts hold the state
        pass

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for part in self.parts.values():
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"parts": {name: part.state_dict() for name, part in self.parts.items()}}

    def load_state_dict(self, state_dict):
        parts = state_dict.get("parts") if isinstance(state_dict, dict) else None
        if parts is None or set(parts) != set(self.parts):
            raise ValueError(f"optimizer state has parts {sorted(parts or {})}, this CompositeOptimizer has "
                             f"{sorted(self.parts)}")
        for name, part in self.parts.items():
            part.load_state_dict(parts[name])
        self.param_groups = [group for part in self.parts.values() for group in part.param_groups]

    def __repr__(self):
        inner = ", ".join(f"{name}: {type(part).__name__}" for name, part in self.parts.items())
        return f"CompositeOptimizer({inner})"
