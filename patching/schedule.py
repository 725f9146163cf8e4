"""Active windows on the sampling schedule, given as fractions (0 = first step, 1 = last) like ComfyUI's
ControlNet and IPAdapter start/end inputs, and checked against the sigma of the current model call."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScheduleWindow:
    sigma_start: float  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float

    @classmethod
    def from_percent(cls, model, start_percent: float, end_percent: float) -> "ScheduleWindow":
        ms = model.get_model_object("model_sampling")
        return cls(float(ms.percent_to_sigma(start_percent)), float(ms.percent_to_sigma(end_percent)))

    def contains(self, sigmas: torch.Tensor) -> bool:
        sigma = float(sigmas.detach().max())
        return self.sigma_end <= sigma <= self.sigma_start
