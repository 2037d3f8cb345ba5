"""LoRA fine-tuning of a causal LM on BBC News text through the similarity loss, with
``transformers.Trainer``: the fused path (``hf.use_similarity_logits(model, fused_loss=True)``,
no (B, T, V) logits) or the materialising one (the swapped head's logits through Hugging Face's
own loss), with loss, throughput and peak memory measured the same way for both."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .memory import PeakMemory

LOSSES = ("fused", "materialising")


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 64
    learning_rate: float = 1e-3
    rank: int = 8
    scale: float = 20.0
    seed: int = 0


def bbc_blocks(tokenizer, seq_len: int, *, seed: int = 0, limit: int | None = None) -> list[dict]:
    """The training articles of BBC News (title and full opening as the demo reads them),
    tokenised, joined by the end-of-text token and cut into blocks of ``seq_len`` tokens."""
    from .data import load_bbc_news

    data = load_bbc_news(opening_chars=2000, seed=seed)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for example in data.train:
        stream.extend(tokenizer(f"{example.fields['title']}\n{example.fields['body']}",
                                add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    blocks = []
    for start in range(0, len(stream) - seq_len + 1, seq_len):
        ids = torch.tensor(stream[start:start + seq_len])
        blocks.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        if limit is not None and len(blocks) == limit:
            break
    return blocks


def finetune(model_name: str, config: FinetuneConfig, loss: str, *, progress: bool = True,
             output_dir: str | None = None) -> dict:
    """One LoRA run of ``config.steps`` optimizer steps; returns its figures."""
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from .. import hf
    from ..bases import SemanticBasis
    from .models import load_model

    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(model_name, verbose=progress)
    bases = SemanticBasis.from_model(model, tokenizer=tokenizer).vectors
    blocks = bbc_blocks(tokenizer, config.seq_len, seed=config.seed,
                        limit=config.steps * config.batch_size)
    switch = hf.use_similarity_logits(model, scale=config.scale, bases=bases, fused_loss=loss == "fused")
    lora = LoraConfig(r=config.rank, lora_alpha=2 * config.rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=output_dir or scratch, max_steps=config.steps, per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
            logging_steps=min(10, config.steps),
            save_strategy="no", report_to=[], use_cpu=True, seed=config.seed, data_seed=config.seed,
            disable_tqdm=not progress, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=blocks)
        with PeakMemory() as peak:
            started = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - started
    switch.restore()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tokens = config.steps * config.batch_size * (config.seq_len - 1)  # counted targets (every block is full)
    return {
        "loss": loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "logged_losses": losses,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "peak_rss_mib": peak.mib,
        "peak_above_start_mib": peak.above_start_mib,
        "trainable_parameters": trainable,
        "blocks": len(blocks),
        "config": asdict(config),
    }


def format_finetune_table(results: list[dict]) -> str:
    lines = [f"{'loss':<15}{'first':>8}{'last':>8}{'tokens/s':>10}{'seconds':>9}{'peak RSS MiB':>14}"
             f"{'above start':>13}", "-" * 77]
    for r in results:
        lines.append(f"{r['loss']:<15}{r['first_logged_loss']:>8.3f}{r['last_logged_loss']:>8.3f}"
                     f"{r['tokens_per_second']:>10.0f}{r['seconds']:>9.1f}{r['peak_rss_mib']:>14.0f}"
                     f"{r['peak_above_start_mib']:>13.0f}")
    return "\n".join(lines)
