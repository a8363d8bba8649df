"""Wall time per optimizer step of the HuggingFace Trainer on a small T5 (2 + 2 layers, d = 64, B = 16, input
length 32, labels 8, dropout 0.1, random weights from a config), the plain Trainer against NoiseScaleTrainer
measuring every step, alternated, one thread, CPU; the median of each run's steps after the first two.
A benchmark, not a test: the machine's load shows in the spread.

    python analysis/bench_trainer_t5.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

try:
    import transformers
except ImportError as error:   # an optional dependency ("[dev]" installs it)
    raise SystemExit(f"this benchmark needs transformers: {error}")

from noisescale.integrations.huggingface import NoiseScaleTrainer
from noisescale.integrations.observer import NoiseScaleOptions

BATCH, LENGTH, LABELS, VOCAB, STEPS = 16, 32, 8, 256, 22


def _model():
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, num_layers=2, d_model=64, d_kv=16, d_ff=128, num_heads=4, dropout_rate=0.1,
        decoder_start_token_id=0, pad_token_id=0))


def _data():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (BATCH * STEPS, LENGTH), generator=generator)
    labels = torch.randint(1, VOCAB, (BATCH * STEPS, LABELS), generator=generator)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(len(ids))]


class _Clock(transformers.TrainerCallback):
    def __init__(self):
        self.times, self.start = [], 0.0

    def on_step_begin(self, *args, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def step_ms(trainer_class, data, **options) -> float:
    """Median wall time of one optimizer step in ms, the first two steps (plans, probes) left out."""
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=1e-3,
            logging_steps=1000, report_to=[], save_strategy="no", use_cpu=True, seed=3, disable_tqdm=True,
            dataloader_num_workers=0)
        clock = _Clock()
        trainer = trainer_class(model=_model(), args=args, train_dataset=data, **options)
        trainer.add_callback(clock)
        trainer.train()
    return statistics.median(clock.times[2:]) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data, plain, measured = _data(), [], []
    for _ in range(args.repeats):
        plain.append(step_ms(transformers.Trainer, data))
        measured.append(step_ms(NoiseScaleTrainer, data, noise_scale=NoiseScaleOptions()))
    print(f"plain Trainer {[round(t, 1) for t in plain]} ms/step, NoiseScaleTrainer {[round(t, 1) for t in measured]}"
          f" ms/step, ratio of medians {statistics.median(measured) / statistics.median(plain):.2f}")


if __name__ == "__main__":
    main()
