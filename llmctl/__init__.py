"""llmctl: a config-driven pipeline for language-model engineering."""

__version__ = "0.1.0"

STAGES = ("pretrain", "finetune", "distill", "prune", "quantize", "export", "eval", "generate", "serve")
