"""PFA, Progressive Fourier Aggregation (PRR-FL, Chen et al., MICCAI 2021), as a run strategy.

Reference: Chen et al., "Personalized Retrogress-Resilient Framework for
Real-World Medical Federated Learning", MICCAI 2021. The formulas are those of
:mod:`fedsilo.models.fourier_agg` (our reading of the paper, stated there).

Each round a silo uploads, for every shared tensor, the amplitudes of its weight's 2-D spectrum
inside a centred low-frequency window and exact zeros outside it
(:func:`fedsilo.models.fourier_agg.window_amplitude_array`): an array of the tensor's shape and
dtype, so the upload has the same byte count as FedAvg's. The coordinator's weighted mean of these
arrays is the weighted mean of the window amplitudes; each silo then puts that mean inside the
window and keeps everything else of its own
(:func:`fedsilo.models.fourier_agg.combine_array`). The window grows from 0.7 of the spectrum in
the first round to 0.95 in the last (:func:`fedsilo.models.fourier_agg.window_ratio`).

What stays on the silo: every phase, the amplitudes outside the window, and the normalisation
layers (kept local, as in FedBN). Scalar and empty tensors, which have no 2-D spectrum, stay local too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedsilo.core.lazy import lazy_module
from fedsilo.core.methods import BenchDefaults, DpLevel, register_method
from fedsilo.silo_agent.presets import DEMO_PRIVACY, PFA_HE_BOUND
from fedsilo.silo_agent.strategy import Strategy

torch = lazy_module("torch")
models = lazy_module("fedsilo.models")
fourier = lazy_module("fedsilo.models.fourier_agg")

if TYPE_CHECKING:
    from fedsilo.silo_agent.state import AgentState

def _wire_dtype(dtype: torch.dtype) -> type[np.floating]:
    """The upload's numpy dtype for a tensor of ``dtype``: the same where numpy has it, else float32."""
    return {torch.float64: np.float64, torch.float16: np.float16}.get(dtype, np.float32)


@register_method
class Pfa(Strategy):
    """Shares the low-frequency amplitudes of every non-normalisation floating-point tensor of at
    least one dimension; the upload and apply rules are the module's."""

    name = "pfa"
    summary = ("amplitudes of each weight's spectrum inside a low-frequency window (0.7 -> 0.95) averaged; own phase "
               "and norm layers kept (PRR-FL, Chen et al. 2021)")
    order = 70
    refuses = {DpLevel.SILO: "its uploads are spectrum amplitudes, not updates the noise regulator can clip"}
    he_bound = PFA_HE_BOUND
    bench = BenchDefaults(privacy=DEMO_PRIVACY, note="amplitudes inside a low-frequency window (0.7 -> 0.95) "
                          "averaged; own phase, outer amplitude and norm layers kept (PRR-FL, Chen et al. 2021)")

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        value = model.state_dict()[name]
        return value.dim() >= 1 and value.numel() > 0 and name not in models.local_parameter_names(model)

    def upload(self, *, trained: Mapping[str, torch.Tensor], state: AgentState, names: Sequence[str], rnd: int,
               total_rounds: int) -> dict[str, np.ndarray]:
        """The window amplitudes of each trained tensor in ``names``, zeros outside the window.

        Returns:
            Per name, an array of the tensor's shape (float64 for a float64 tensor, float16 for
            float16, float32 otherwise).
        """
        ratio = fourier.window_ratio(rnd, total_rounds)
        out: dict[str, np.ndarray] = {}
        for k in names:
            value = trained[k].detach().cpu()
            amplitudes = fourier.window_amplitude_array(value.to(torch.float64).numpy(), ratio)
            out[k] = amplitudes.astype(_wire_dtype(value.dtype))
        return out

    def apply(self, *, mean: Mapping[str, np.ndarray], state: AgentState, rnd: int, total_rounds: int) -> None:
        """Sets each shared tensor to the silo's trained weight (``state.model``) with the mean
        amplitudes inside the round's window, in the dtype ``state.global_shared`` stores it in."""
        ratio = fourier.window_ratio(rnd, total_rounds)
        for k, arr in mean.items():
            own = state.model[k].detach().cpu()
            dtype = state.global_shared[k].dtype if k in state.global_shared else own.dtype
            new = fourier.combine_array(own.to(torch.float64).numpy(), np.asarray(arr), ratio)
            state.global_shared[k] = torch.from_numpy(np.ascontiguousarray(new)).to(dtype)
