"""The demo's and the bench's preset settings: model, training, privacy plans, budgets and HE bounds (torch-free)."""

from __future__ import annotations

from typing import Any

#: Model and local-training settings of the demo (small enough for a 2-core laptop).
DEMO_MODEL: dict[str, Any] = {"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1}
DEMO_TRAINING: dict[str, Any] = {"local_epochs": 1, "batch_size": 8}
#: The demo's privacy plan: record-level DP-SGD, σ calibrated so that the whole run costs at most
#: ε = 8 at δ = 1e-5 (each silo holds 48 training images: q = 0.25 is about 12 per step).
DEMO_PRIVACY: dict[str, Any] = {"record_level": True, "sample_rate": 0.25, "steps_per_round": 12,
                                "max_grad_norm": 1.0, "target_epsilon": 8.0, "delta": 1e-5}
#: Each demo hospital's budget (silo.toml [privacy]); the run fits it with room to spare.
DEMO_BUDGET: dict[str, Any] = {"epsilon": 10.0, "delta": 1e-5}
#: LoRA strategies fine-tune a base pretrained on a source domain no silo holds; their privacy is
#: silo-level (DEeR's noise regulator), split into shares under HE, σ calibrated for ε ≤ 8 per run
#: against the aggregate.
DEMO_LORA: dict[str, Any] = {"rank": 4, "alpha": 8.0, "init_seed": 0}
DEMO_LORA_PRIVACY: dict[str, Any] = {"silo_level": True, "update_clip_norm": 0.05, "update_target_epsilon": 8.0,
                                     "delta": 1e-5}
DEMO_PRETRAIN_EPOCHS = 30
DEMO_LORA_HE_BOUND = 64.0
#: pFL-ResFIM strategies; their uploads are parameter values (not differences), so the HE bound
#: covers the largest weight of the demo network.
DEMO_RESFIM: dict[str, Any] = {"rho": 0.1, "recompute_every": 5, "max_examples": 32}
DEMO_RESFIM_HE_BOUND = 8.0
#: ResFIM with DP: the masks' noisy Fisher (σ_F = 5, per-example clip 1) and the style bank (σ = 3,
#: clip 40 per image, [resfim] style_clip_norm) are ledgered too, inside the same ε ≤ 8 target.
#: PFA uploads spectrum amplitudes: up to about 17 for the demo UNet at initialisation (the window's DC
#: term of a (64, 288) weight), so its HE bound leaves room for training to grow them.
PFA_HE_BOUND = 64.0
DEMO_RESFIM_PRIVACY: dict[str, Any] = {**DEMO_PRIVACY, "fisher_noise_multiplier": 5.0, "fisher_clip_norm": 1.0,
                                       "style_noise_multiplier": 3.0}
