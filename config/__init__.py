"""Typed configuration of playbus: schema, loader and the example campaign."""

from __future__ import annotations

if not __name__.startswith("playbus."):
    raise ImportError(f"import playbus.{__name__}, not {__name__}: this folder is a subpackage of playbus")

from playbus.config.errors import ConfigError
from playbus.config.loader import load_config, parse_config
from playbus.config.schema import (
    BatchConfig,
    BudgetConfig,
    CampaignConfig,
    CapConfig,
    Config,
    DurabilityConfig,
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
    "DurabilityConfig",
    "ConfigError",
    "RuleConfig",
    "SandboxConfig",
    "TargetConfig",
    "load_config",
    "parse_config",
]
