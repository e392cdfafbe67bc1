"""LoRA adapters: PEFT directories read without PEFT (`adapter`), the slot pool and the step's
rows per adapter (`pool`), the batched LoRA delta on target layers (`linear`)."""

from hearth.engine.lora.adapter import AdapterError, LoraWeights, read_adapter
from hearth.engine.lora.pool import LoraManager, lora_manager

__all__ = ["AdapterError", "LoraManager", "LoraWeights", "lora_manager", "read_adapter"]
