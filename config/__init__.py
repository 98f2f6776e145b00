"""Typed configuration of playbus: schema, loader and the example campaign."""

from __future__ import annotations

from config.errors import ConfigError
from config.loader import load_config, parse_config
from config.schema import (
    BatchConfig,
    BudgetConfig,
    CampaignConfig,
    CapConfig,
    Config,
    RuleConfig,
    SandboxConfig,
    TargetConfig,
)

__all__ = [
    "BatchConfig",
    "BudgetConfig",
    "CampaignConfig",
    "CapConfig",
    "Config",
    "ConfigError",
    "RuleConfig",
    "SandboxConfig",
    "TargetConfig",
    "load_config",
    "parse_config",
]
