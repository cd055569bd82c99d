"""Configuration: YAML files plus ``--set a.b=c`` overrides, loaded into frozen dataclasses.

Owns the schema of every section (docs/configuration.md). Unknown keys and bad values raise
``ConfigError`` naming the dotted key. The ``sglang`` section is passed verbatim to SGLang's server
arguments and is only checked here for being a mapping; ``integration/`` checks its keys against
SGLang's own parser. Must not import sglang, torch or any other package module but ``errors``.

A config file may name a base file with ``base: other.yaml`` (relative to itself); the file's
sections are deep-merged over the base's.

Modules: ``rules`` (how a section declares and checks a key: ``key(default, rule)``, ``Section``),
``sections`` (the schema: one dataclass per section), ``loader`` (files, overrides, coercion).
"""

from alchemist_sgl.config.loader import config_from_json, config_to_dict, config_to_json, load_config
from alchemist_sgl.config.rules import Rule, Section
from alchemist_sgl.config.sections import (LORA_TARGETS, RECORD_TENSORS, REFUSED_VALUES, RETIRED_KEYS,
                                           Config, FeedbackConfig, GateConfig, GuardConfig, LoraConfig,
                                           MemoryConfig, PublishConfig, RecordConfig, ServerConfig,
                                           StoreConfig, TrainConfig)

__all__ = ["LORA_TARGETS", "RECORD_TENSORS", "REFUSED_VALUES", "RETIRED_KEYS", "Config", "FeedbackConfig",
           "GateConfig", "GuardConfig", "LoraConfig", "MemoryConfig", "PublishConfig", "RecordConfig",
           "Rule", "Section", "ServerConfig", "StoreConfig", "TrainConfig", "config_from_json",
           "config_to_dict", "config_to_json", "load_config"]
