"""Run by tests/test_train.py under `torchrun --nproc-per-node=2` (gloo on CPU): a few steps of the
shared Trainer on a tiny model; each rank writes what it saw to <out>/rank<r>.json — its weights'
hash before and after training, the examples of each batch, its own random draws (as MLM masking
and dropout make) and the loss the loop reported. With `stop`, only rank 1 receives SIGTERM (at
step 2) and each rank records the step at which it stopped."""

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from llmctl.core.device import seed_everything, setup_runtime
from llmctl.core.errors import Interrupted
from llmctl.core.train import Trainer


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 8)
        self.out = torch.nn.Linear(8, 64)

    def forward(self, input_ids, labels):
        return torch.nn.functional.cross_entropy(
            self.out(torch.nn.functional.dropout(self.emb(input_ids), 0.3, self.training)).flatten(0, 1),
            labels.flatten(),
        )


def weights(model) -> str:
    model = getattr(model, "module", model)
    return hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()


def main(out: Path, stop: bool) -> None:
    rt = setup_runtime("cpu", "fp32")
    seed_everything(0)
    model = Tiny()
    data = [{"input_ids": torch.tensor([i, (i + 1) % 64, (i + 2) % 64]), "index": i} for i in range(64)]
    seen, draws, losses = [], [], []
    stop_at_rank1 = stop

    def collate(rows):
        seen.append([r["index"] for r in rows])
        draws.append(float(torch.rand(1)))  # what a masking collator draws from the global RNG
        ids = torch.stack([r["input_ids"] for r in rows])
        return {"input_ids": ids, "labels": (ids + 1) % 64}

    class Recording(Trainer):
        def _optimizer_step(self, batches, accum):
            if stop_at_rank1 and self.rt.rank == 1 and self.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # a scheduler stopping one process only
            loss, agreed_stop, terms = super()._optimizer_step(batches, accum)
            losses.append(loss)
            return loss, agreed_stop, terms

    cfg = OmegaConf.create(
        {
            "max_steps": 5,
            "batch_size": 4,
            "grad_accum": 1,
            "lr": 0.05,
            "weight_decay": 0.0,
            "betas": [0.9, 0.999],
            "warmup_ratio": 0.0,
            "scheduler": "constant",
            "max_grad_norm": 1.0,
            "eval_every": 0,
            "log_every": 1,
            "save_every": 0,
            "num_workers": 0,
        }
    )
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Recording(
        model,
        train_data=data,
        collate=collate,
        cfg=cfg,
        rt=rt,
        run_dir=run_dir,
        state_dir=out / "run.state",
        seed=1,
        loss_fn=lambda m, b: m(**b),
    )
    initial = weights(trainer.model)
    try:
        trainer.fit()
        stopped = None
    except Interrupted:
        stopped = trainer.step
    (out / f"rank{rt.rank}.json").write_text(
        json.dumps(
            {
                "initial": initial,
                "final": weights(trainer.model),
                "batches": seen,
                "draws": draws,
                "loss": losses,
                "stopped_at": stopped,
            }
        )
    )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), stop=sys.argv[2:] == ["stop"])
