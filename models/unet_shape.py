"""The shape rule of a UNet config (channels, strides, residual units), 2-D or 3-D alike; torch-free."""

from __future__ import annotations

from typing import Any

from fedsilo.core.validators import check_int


def check_unet_shape(owner: str, cfg: Any) -> None:
    """Checks a UNet config's ``in_channels``, ``out_channels``, ``channels``, ``strides`` and
    ``num_res_units`` (2-D or 3-D alike): ValueError naming ``owner`` and the field."""
    check_int(owner, "in_channels", cfg.in_channels, minimum=1)
    check_int(owner, "out_channels", cfg.out_channels, minimum=2)
    for name in ("channels", "strides"):
        value = getattr(cfg, name)
        if not isinstance(value, tuple):
            raise ValueError(f"{owner}.{name} must be a tuple of ints, got {value!r}")
        for i, item in enumerate(value):
            check_int(owner, f"{name}[{i}]", item, minimum=1)
    if len(cfg.channels) < 2:
        raise ValueError(f"{owner}.channels needs at least 2 levels, got {cfg.channels!r}")
    if len(cfg.strides) != len(cfg.channels) - 1:
        raise ValueError(
            f"{owner}.strides must have len(channels) - 1 = {len(cfg.channels) - 1} entries, "
            f"got {cfg.strides!r}"
        )
    check_int(owner, "num_res_units", cfg.num_res_units, minimum=0)
