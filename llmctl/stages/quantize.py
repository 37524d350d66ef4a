"""llmctl quantize — not built yet: it lands with its own issue (see ../shared/roadmap.md).

The command and its config root (conf/quantize.yaml) exist so scripts and sweeps can name it; running
it says so and exits non-zero instead of producing fake output.
"""

from llmctl.core.errors import LlmctlError


def run(cfg) -> None:
    raise LlmctlError("`llmctl quantize` is not built yet; it lands with its own issue. Available now: llmctl pretrain, llmctl finetune, llmctl generate, llmctl ckpt")
