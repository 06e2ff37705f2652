"""`hanlin train pretrain`: next-token training on a prepared token dataset, then a Hugging Face export."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hanlin.errors import HanlinError
from hanlin.train import distributed
from hanlin.train.config import TrainConfig
from hanlin.train.init import build_model
from hanlin.train.loop import Trainer, TrainResult
from hanlin.train.losses import lm_loss_with

if TYPE_CHECKING:
    from hanlin.tokenizer import Tokenizer
    from hanlin.train.data import TokenDataset

FINAL_DIR = "final"


def run_pretrain(config: TrainConfig, run_dir: Path, resume: bool = False) -> TrainResult:
    """Trains config.model (or continues config.init_from) on config.data.path's train split, validates on its
    validation split (or config.data.validation_path's), checkpoints under run_dir and exports run_dir/final
    (a Hugging Face directory that `hanlin serve --model` and transformers load). Under torchrun every rank
    runs this with the same config."""
    from hanlin.train.data import TokenDataset, load_tokenizer
    from hanlin.train.packing import PackedBatches, validation_batches

    config.check()
    run_dir = Path(run_dir)
    if not config.data.path:
        raise HanlinError("data.path is not set: point it at a dataset made by `hanlin data prepare`")
    info = distributed.init_from_env(config.device) if config.distributed != "none" else distributed.info()
    data = config.data
    tokenizer, _ = load_tokenizer(config.tokenizer)
    train_set = TokenDataset(data.path, "train")
    train_set.check_tokenizer(tokenizer, config.tokenizer)
    validation_set = _validation_split(data.validation_path or data.path, data.validation_path is not None)
    if validation_set is not None:
        validation_set.check_tokenizer(tokenizer, config.tokenizer)
    model_config, model = build_model(config)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise HanlinError(f"model.vocab_size is {model_config.vocab_size} but the tokenizer {config.tokenizer!r} has "
                          f"{tokenizer.vocab_size} tokens; set model.vocab_size >= {tokenizer.vocab_size}")
    batches = PackedBatches(train_set, data.seq_len, data.micro_batch_size, data.seed, info.rank, info.world_size)

    def validation():
        return validation_batches(validation_set, data.seq_len, data.micro_batch_size, config.eval_batches,
                                  info.rank, info.world_size)

    trainer = Trainer(config, model, batches, lm_loss_with(config.moe), run_dir,
                      validation if validation_set is not None else None, resume=resume)
    result = trainer.fit()
    export_final(trainer, tokenizer, run_dir / FINAL_DIR)
    return result


def export_final(trainer: Trainer, tokenizer: Tokenizer, directory: Path) -> Path:
    """The trained model as a Hugging Face directory (collective under torch.distributed)."""
    from hanlin.train.export import export_hf

    return export_hf(trainer.wrapped, trainer.model_config, tokenizer, directory)


def _validation_split(path: str, separate: bool) -> TokenDataset | None:
    """The dataset's "validation" split (None when it has none or it is empty); a separate validation dataset
    may hold its documents in a "train" split."""
    from hanlin.train.data import TokenDataset, read_meta

    splits = read_meta(Path(path).expanduser())["splits"]
    for split in ("validation", "train") if separate else ("validation",):
        if split in splits:
            return TokenDataset(path, split) if int(splits[split]["tokens"]) >= 2 else None
    return None
