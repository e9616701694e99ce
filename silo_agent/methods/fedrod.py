"""FedRoD (Chen & Chao, ICLR 2022): shared body + generic head (balanced softmax), and a personal head kept local."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsilo.core.lazy import lazy_module
from fedsilo.core.methods import BenchDefaults, DpLevel, register_method
from fedsilo.silo_agent.strategy import Strategy, StrategyError

torch = lazy_module("torch")

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

    from fedsilo.silo_agent.state import AgentState

#: The wrapper's attribute (and state_dict prefix) of the personal head: never shared, never uploaded.
PERSONAL = "personal_head"
#: The silo's pixel-class counts in ``AgentState.strategy_state`` (they never leave the silo).
COUNTS_KEY = "fedrod/class_counts"

_WHY_NO_RECORD_DP = ("its balanced loss reads the silo's pixel-class frequencies, a statistic of all its records "
                     "in every example's loss, which DP-SGD's per-example accounting does not cover")


def __getattr__(name: str) -> Any:
    """``TwoHeadNet``, built on first use (PEP 562): the coordinator imports this module without torch."""
    if name == "TwoHeadNet":
        return two_head_net_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def two_head_net_class() -> type:
    """The class :class:`TwoHeadNet` (an ``nn.Module``; defined, and torch imported, on the first call)."""
    cls = globals().get("TwoHeadNet")
    if cls is None:
        cls = globals()["TwoHeadNet"] = _two_head_net_class()
    return cls


def _two_head_net_class() -> type:
    from torch import nn

    class TwoHeadNet(nn.Module):
        """The Task's network (body + generic head) with a personal head beside the generic head.

        ``forward(x) = net(x) + personal_head(h.detach())``: the generic logits plus the personal
        logits (FedRoD's personalised prediction, Chen & Chao 2022, Sec. 4), h the input of the
        generic head (``fedper.head_prefix``: the network's last module that owns parameters).

        Our choice of personal head: a copy of the generic head's module (same layer, FedRoD's
        personal and generic heads share an architecture), fed the generic head's own input,
        detached (no gradient from it reaches the body), with **all parameters zero** at
        construction: the personalised model starts equal to the generic one, and every silo
        builds the same weights (the fingerprint covers this class, the head's name and the
        copy). A zero personal head gives exactly the generic output (``generic + 0``);
        :meth:`generic` runs the generic model alone.

        Attributes:
            net: the Task's network (shared).
            personal_head: the personal head (local).
            head_name: the generic head's module name inside ``net``.
        """

        def __init__(self, net: nn.Module, head_name: str) -> None:
            super().__init__()
            self.net = net
            self.head_name = head_name
            head = copy.deepcopy(net.get_submodule(head_name))
            with torch.no_grad():
                for p in head.parameters():
                    p.zero_()
            self.personal_head = head

        @property
        def num_classes(self) -> int:
            """Output channels of the heads (the classes, background included)."""
            head = self.personal_head
            for attr in ("out_channels", "out_features"):
                if isinstance(getattr(head, attr, None), int):
                    return int(getattr(head, attr))
            raise ValueError(f"the output head {type(head).__name__} declares no out_channels or out_features")

        def extra_repr(self) -> str:
            return f"head={self.head_name!r}"

        def generic(self, x: Any) -> Any:
            """The generic model's output alone (the shared body and generic head)."""
            return self.net(x)

        def forward(self, x: Any) -> Any:
            seen: list[Any] = []
            handle = self.net.get_submodule(self.head_name).register_forward_pre_hook(
                lambda _module, args: seen.append(args[0]))
            try:
                generic = self.net(x)
            finally:
                handle.remove()
            if len(seen) != 1:
                raise ValueError(f"the generic head {self.head_name!r} ran {len(seen)} times in one forward pass")
            personal = self.personal_head(seen[0].detach())
            if personal.shape != generic.shape:
                raise ValueError(f"the personal head's output {tuple(personal.shape)} does not match the network's "
                                 f"{tuple(generic.shape)}: the generic head {self.head_name!r} must produce the logits")
            return generic + personal

        def __getattr__(self, name: str) -> Any:
            # attributes a Task reads off its network (segmentation-3d's sliding-window settings)
            try:
                return super().__getattr__(name)
            except AttributeError:
                modules = self.__dict__.get("_modules", {})
                if name.startswith("_") or "net" not in modules:
                    raise
                return getattr(modules["net"], name)

    TwoHeadNet.__module__ = __name__
    TwoHeadNet.__qualname__ = "TwoHeadNet"
    return TwoHeadNet


def is_personal(name: str) -> bool:
    """Whether state_dict entry ``name`` belongs to the personal head."""
    return name == PERSONAL or name.startswith(PERSONAL + ".")


def class_counts(dataset: Dataset, num_classes: int) -> torch.Tensor:
    """Pixel (voxel) counts of each class in the labels of ``dataset`` (float64, ``[K]``).

    Reads ``dataset.masks`` when it is one tensor (the built-in 2-D data), else every example's
    target (the second item).

    Raises:
        StrategyError: a label outside ``[0, num_classes)``.
    """
    masks = getattr(dataset, "masks", None)
    labels = [masks] if isinstance(masks, torch.Tensor) else (dataset[i][1] for i in range(len(dataset)))
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for m in labels:
        flat = torch.as_tensor(m).reshape(-1).long()
        if flat.numel() == 0:
            continue
        if int(flat.min()) < 0 or int(flat.max()) >= num_classes:
            raise StrategyError(f"a training label is outside [0, {num_classes}): the network has "
                                f"{num_classes} classes")
        counts += torch.bincount(flat, minlength=num_classes).double()
    return counts


def log_prior(counts: torch.Tensor) -> torch.Tensor:
    """log π_c with π_c = (n_c + 1) / (Σ n + K): the pixel-class frequencies, Laplace-smoothed (our
    choice) so that a class absent from a silo's labels has a finite log-prior."""
    c = counts.double()
    return torch.log((c + 1.0) / (c.sum() + c.numel())).float()


def balanced_logits(logits: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """The balanced-softmax logits ``z_c + log π_c`` of ``[N, K, *spatial]`` logits (``log_pi`` ``[K]``)."""
    shape = (1, -1) + (1,) * (logits.dim() - 2)
    return logits + log_pi.to(device=logits.device, dtype=logits.dtype).view(shape)


class FedRodObjective:
    """FedRoD's local objective (a ``fedsilo.models.training.LocalObjective``), one backward pass:

        L = ℓ_task(z_g + log π, y) + ℓ_task(sg(z_g) + z_p, y)

    z_g the generic logits (``model.net``'s output), z_p the personal logits (the personal
    head's, on detached features), sg the stop-gradient, ℓ_task the Task's loss (DiceCE) and
    π the silo's pixel-class prior (:func:`log_prior`). The first term trains body and generic
    head with the balanced softmax (Ren et al., NeurIPS 2020, "Balanced Meta-Softmax", which
    FedRoD uses as its class-balanced loss): the softmax of ``z + log π`` is the silo's
    posterior, so z itself estimates a prior-free (class-balanced) one. Our adaptation to
    segmentation: π is per pixel class and the shift enters the Task's whole loss (its Dice and
    its cross-entropy; the cross-entropy part is exactly BSM per pixel). The second term trains
    the personal head alone on the personalised prediction, with the ordinary (empirical) loss,
    as in FedRoD (Chen & Chao 2022, Sec. 4). The two terms touch disjoint parameters, so one
    backward pass and one optimiser equal FedRoD's two updates with the same optimiser kind.

    Attributes:
        log_pi: log π, ``[K]``.
    """

    def __init__(self, log_pi: torch.Tensor) -> None:
        self.log_pi = log_pi.detach().to("cpu").float()
        self._seen: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_seen": {}}

    @contextlib.contextmanager
    def attach(self, model: nn.Module, *, device: torch.device,
               forward: Callable[[nn.Module, Any], Any]) -> Iterator[None]:
        """Hooks the generic network's and the personal head's outputs."""
        seen = self._seen

        def keep(key: str) -> Callable[..., None]:
            def hook(_module: Any, _args: Any, out: Any) -> None:
                seen[key] = out
            return hook

        handles = [model.net.register_forward_hook(keep("generic")),
                   model.get_submodule(PERSONAL).register_forward_hook(keep("personal"))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            seen.clear()

    def loss(self, *, model: nn.Module, inputs: Any, targets: Any, output: Any,
             task_loss: Callable[[Any, Any], torch.Tensor]) -> torch.Tensor:
        """The generic head's balanced loss plus the personal head's loss (see the class doc)."""
        generic, personal = self._seen.pop("generic"), self._seen.pop("personal")
        balanced = task_loss(balanced_logits(generic, self.log_pi), targets)
        return balanced + task_loss(generic.detach() + personal, targets)


@register_method
class FedRoD(Strategy):
    """FedRoD: the Task's network (body + generic head) is shared and averaged as in FedAvg (HE
    unchanged); the personal head (:data:`PERSONAL`) is every silo's own.

    * Network: :class:`TwoHeadNet` (``wrap_model``), personalised output = generic + personal.
    * Local loss: :class:`FedRodObjective`, from the silo's pixel-class counts of its training
      labels, counted once and kept in ``state.strategy_state`` (:data:`COUNTS_KEY`): they are
      used in its own loss only and never leave the silo.
    * Evaluation: the silo's own validation and test data with generic + personal (the default
      ``eval_state_dict``); the unseen domain with the generic model alone (the personal head
      zeroed, :meth:`unseen_state_dict`).
    * DP: record-level refused (the class frequencies are a statistic of all the silo's records
      inside every example's loss); silo-level is sound: the upload (body and generic head) is
      clipped and noised as a whole, and the personal head is never uploaded.
    """

    name = "fedrod"
    summary = ("shared body + generic head trained with a balanced softmax and averaged; a personal head on "
               "detached features stays local, its logits added (Chen & Chao 2022)")
    order = 55
    refuses = {DpLevel.RECORD: _WHY_NO_RECORD_DP}
    bench = BenchDefaults(note="body + generic head (balanced softmax over the silo's pixel-class prior) averaged; "
                               "personal head local, evaluated generic + personal; unseen domain: generic "
                               "(Chen & Chao 2022)",
                          why_no_dp=_WHY_NO_RECORD_DP)

    def wrap_model(self, model: nn.Module, *, model_cfg: Any, base_checkpoint: Path | None) -> nn.Module:
        """The Task's network with a zero personal head beside its output head (:class:`TwoHeadNet`)."""
        from fedsilo.silo_agent.methods.fedper import head_prefix

        return two_head_net_class()(model, head_prefix(model)).train(model.training)

    def is_shared(self, name: str, model: nn.Module) -> bool:
        return not is_personal(name)

    def local_objective(self, *, model: nn.Module, state: AgentState, train: Dataset,
                        rnd: int) -> FedRodObjective:
        """:class:`FedRodObjective` from the silo's pixel-class counts (counted on first use).

        Raises:
            StrategyError: ``model`` is not FedRoD's network, or a label is outside its classes.
        """
        if not isinstance(model, two_head_net_class()):
            raise StrategyError("fedrod trains the network its wrap_model built (TwoHeadNet), "
                                f"got {type(model).__name__}")
        counts = state.strategy_state.get(COUNTS_KEY)
        if counts is None:
            counts = class_counts(train, model.num_classes)
            state.strategy_state[COUNTS_KEY] = counts
        return FedRodObjective(log_prior(counts))

    def unseen_state_dict(self, state: AgentState) -> dict[str, torch.Tensor]:
        """The generic model: this silo's model with the personal head zeroed (no silo's head fits a
        domain no silo trains on)."""
        sd = self.eval_state_dict(state)
        return {k: torch.zeros_like(v) if is_personal(k) else v for k, v in sd.items()}
