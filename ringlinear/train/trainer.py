"""The trainer: one process on a CPU or a GPU, or N processes under torchrun (gloo on CPUs, NCCL on
GPUs) with FSDP2.

One step: each process packs its rows of the step (rows at fixed places of the document stream,
which depends on the seed alone) into `grad_accum` micro-batches, runs forward (LM + MTP loss,
documents kept apart) and backward on each; then the gradient norm is clipped, AdamW steps with the
schedule's learning rate, and the routers' expert load, summed over all processes, moves every
process's expert bias alike. A step whose loss or gradient norm is not finite is skipped; too many
in a row stop the run. Validation in bits per byte every `eval_interval` steps, metrics to
`metrics.jsonl` (and TensorBoard), checkpoints to `checkpoints/` for exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from tqdm import tqdm

from ..command import RunFailed
from ..config import read_json
from ..data import EOS, Dataset, PackedDocuments, load_dataset, prepare_dataset
from ..info import describe
from ..model import RingLinearForCausalLM, SequenceContext
from ..ops.policy import KernelPolicy
from .checkpoint import LATEST_LINK, STATE_FILE, checkpoint_dirs, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .evaluate import evaluate
from .metrics import FlopCounter, MetricsLog, SpikeDetector, expert_load_stats, peak_flops, peak_memory_gib
from .optimizer import build_optimizer, optimizer_step
from .parallel import World, all_reduce, compute_dtype, parallelize, process_group, resolve_device
from .schedule import LearningRate, Stages


class TrainingDiverged(RunFailed):
    """Too many steps in a row had a non-finite loss or gradient norm."""


@dataclass
class TrainResult:
    model: RingLinearForCausalLM | None  # the final checkpoint's model, loaded on the main process only
    tokenizer: Tokenizer
    val_bpb: float
    checkpoint_dir: Path  # the final model in the Hugging Face layout


def _check_run_folder(out: Path, config: TrainConfig, resume: bool) -> Path | None:
    """Check that a new run's folder holds no run, or that the run resumed has these settings; return the
    checkpoint to resume from (None: start at step 0)."""
    saved_path = out / "train_config.json"
    if not resume:
        if (out / "checkpoints").exists():
            raise ValueError(f"{out} already holds a run; add --resume to continue it, or choose another --out-dir")
        return None
    if not saved_path.exists():
        raise FileNotFoundError(f"nothing to resume: no {saved_path}")
    saved = read_json(saved_path)
    now = dataclasses.asdict(config)
    # The device may change (same math, not bit-identical across devices), and the number of steps as long
    # as the steps taken keep their learning rates (below); the rest defines the run.
    differ = [f"{k}: {saved.get(k)!r} in the run, {now[k]!r} now" for k in now
              if k not in ("device", "out_dir", "steps") and saved.get(k) != now[k]]
    if differ:
        raise ValueError(f"--resume needs the settings the run was started with; these differ: {'; '.join(differ)}")
    checkpoints = checkpoint_dirs(out)
    if not checkpoints:
        return None
    taken = read_json(checkpoints[-1] / STATE_FILE)["step"]
    if config.steps < taken:
        raise ValueError(f"--steps {config.steps}: the run has already taken {taken} steps")
    before, after = LearningRate.of(dataclasses.replace(config, steps=saved["steps"])), LearningRate.of(config)
    changed = next((s for s in range(taken) if before(s) != after(s)), None)
    if changed is not None:
        raise ValueError(f"--steps {config.steps}: the {config.lr_schedule} schedule of {saved['steps']} steps would "
                         f"change the learning rate of step {changed + 1}, already taken, from {before(changed):.4g} "
                         f"to {after(changed):.4g}; a run extends while the learning rates of its steps stay (wsm: "
                         f"always, wsd: before its decay), or start a new one from its weights with --init-from "
                         f"{out / LATEST_LINK}")
    return checkpoints[-1]


def _dataset(config: TrainConfig, vocab_size: int, world: World) -> Dataset:
    """The tokenized corpus; the main process tokenizes, the others wait and read its files."""
    if config.tokenized:
        data = load_dataset(config.tokenized)
    else:
        cache = Path(config.out_dir) / "data"
        tokenizer_file = Path(config.init_from, "tokenizer.json") if config.init_from else None
        if tokenizer_file and not tokenizer_file.exists():
            raise FileNotFoundError(f"{config.init_from} has no tokenizer.json: continued training needs the "
                                    "model's own tokenizer")
        if world.is_main:
            data = prepare_dataset(cache, config.data, vocab_size, config.val_fraction, tokenizer_file)
        dist.barrier()
        if not world.is_main:
            data = load_dataset(cache)
    if data.tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"the tokenizer has {data.tokenizer.get_vocab_size()} tokens, more than the model's "
                         f"vocab_size={vocab_size}")
    return data


class Trainer:
    def __init__(self, config: TrainConfig, world: World, resume: bool = False):
        self.config, self.world = config, world
        self.out = Path(config.out_dir)
        checkpoint = _check_run_folder(self.out, config, resume)
        model_config = config.model_config()
        self.stages = Stages(config)
        for step, _ in self.stages.batch:
            if self.stages.batch_size(step) % (world.size * config.grad_accum):
                raise ValueError(f"batch size {self.stages.batch_size(step)} (from step {step}) must be a multiple of "
                                 f"processes × grad_accum = {world.size} × {config.grad_accum}")
        self.data = _dataset(config, model_config.vocab_size, world)
        eos = self.data.tokenizer.token_to_id(EOS)
        # validation: fixed rows of the first seq_len spread over the validation documents in file order
        try:
            val_rows = PackedDocuments(self.data.val.tokens, self.data.val.offsets, eos).spread(
                config.eval_batches * config.batch_size, config.seq_len)
        except ValueError as e:
            raise ValueError(f"validation: {e}; give more text, a larger --val-fraction or a smaller --seq-len") \
                from None
        self.val_batches = val_rows[world.rank::world.size]
        if world.is_main:
            print(self.data.describe())
            print(describe(model_config))
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")

        torch.manual_seed(config.seed)
        model = (RingLinearForCausalLM.from_pretrained(config.init_from, dtype=torch.float32, config=model_config)
                 if config.init_from else RingLinearForCausalLM(model_config))
        model = model.to(world.device).train()
        self.model = parallelize(model, world, compute_dtype(config.param_dtype, world.device),
                                 config.activation_checkpointing, config.recompute)
        self.policy = KernelPolicy(fp8=config.precision == "fp8").resolve(world.device)
        self.optimizer = build_optimizer(self.model, config.lr, config.weight_decay, (config.beta1, config.beta2))
        self.lr = LearningRate.of(config)
        self.moe_layers = [i for i in range(model_config.num_hidden_layers + model_config.num_nextn_predict_layers)
                           if model_config.is_moe_layer(i)]
        self.train_stream = PackedDocuments(self.data.train.tokens, self.data.train.offsets, eos, config.seed)
        self.flops, self.peak = FlopCounter(model_config), peak_flops(config.peak_tflops, world.device)
        self.start, self.skipped_in_a_row, self.spikes = 0, 0, SpikeDetector(config.spike_sigmas)
        if resume:
            self._resume(checkpoint)

    def _resume(self, checkpoint: Path | None) -> None:
        if checkpoint is None:  # stopped before its first checkpoint was complete
            if self.world.is_main:
                print(f"no complete checkpoint in {self.out / 'checkpoints'}: the run starts again from step 0, "
                      "with its settings and data")
            return
        state = load_checkpoint(checkpoint, self.model, self.optimizer, self.world)
        self.start, self.skipped_in_a_row = state["step"], state["skipped_in_a_row"]
        self.spikes = SpikeDetector(self.config.spike_sigmas, history=state["loss_history"])
        if state["tokens"] != self.stages.position(self.start):
            raise ValueError(f"{checkpoint} was saved at data position {state['tokens']}, but the schedule "
                             f"places step {self.start} at {self.stages.position(self.start)}")

    def train_step(self, step: int) -> dict:
        c, world = self.config, self.world
        lr = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch_size, seq_len = self.stages.batch_size(step), self.stages.seq_len(step)
        rows = batch_size // (world.size * c.grad_accum)
        origin, step_row, stage_rows = self.stages.rows(step)
        t0 = time.perf_counter()
        totals = torch.zeros(4, dtype=torch.float64, device=world.device)  # loss, lm_loss, mtp_loss, FLOPs
        for micro in range(c.grad_accum):
            first = step_row + (world.rank * c.grad_accum + micro) * rows
            starts = self.train_stream.row_starts(origin, seq_len, range(first, first + rows), stage_rows)
            batch = self.train_stream.batch(starts, seq_len).to(world.device)
            out = self.model(batch.input_ids, labels=batch.input_ids,
                             context=SequenceContext(batch.cu_seqlens, self.policy), return_logits=False)
            # A checkpointed layer routes again in the backward and counts its load twice: every expert
            # of that layer alike, which neither the bias update (signs) nor the logged shares see.
            (out.loss / c.grad_accum).backward()
            mtp = out.mtp_loss.item() if out.mtp_loss is not None else 0.0
            totals[:3] += torch.tensor([out.loss.item(), out.lm_loss.item(), mtp], dtype=torch.float64,
                                       device=world.device) / c.grad_accum
            totals[3] += self.flops(batch.cu_seqlens.diff().tolist())
        all_reduce(totals)
        loss, lm_loss, mtp_loss = (totals[:3] / world.size).tolist()
        outcome = optimizer_step(self.model, self.optimizer, loss, c.grad_clip, c.bias_update_rate)
        if world.device.type == "cuda":
            torch.cuda.synchronize(world.device)  # the step's time includes its queued GPU work
        seconds = time.perf_counter() - t0

        metrics = {"loss": loss, "lm_loss": lm_loss, "lr": lr, "grad_norm": outcome.grad_norm}
        if out.mtp_loss is not None:
            metrics["mtp_loss"] = mtp_loss
        metrics.update(batch_size=batch_size, seq_len=seq_len, tokens=self.stages.position(step + 1),
                       tokens_per_s=batch_size * seq_len / seconds, memory_gib=peak_memory_gib(world.device),
                       flops=float(totals[3]))  # the step's model FLOPs over all processes
        if self.peak:
            metrics["mfu"] = float(totals[3]) / (seconds * world.size * self.peak)
        if outcome.expert_load is not None:
            metrics["expert_load"] = expert_load_stats(outcome.expert_load, self.moe_layers)
        if not outcome.applied:
            metrics["skipped"] = True
        return metrics

    def fit(self) -> TrainResult:
        c, world = self.config, self.world
        log = MetricsLog(self.out, c.tensorboard, world.is_main)
        say = tqdm.write if world.is_main else (lambda text: None)

        def validate(step: int) -> float:
            val_loss, val_bpb = evaluate(self.model, self.val_batches, self.data.token_bytes, self.policy)
            log.write(step, val_loss=val_loss, val_bpb=val_bpb)
            say(f"step {step}: validation loss {val_loss:.4f} nats/token, {val_bpb:.4f} bits/byte")
            return val_bpb

        progress = tqdm(range(self.start, c.steps), initial=self.start, total=c.steps, desc="training", unit="step",
                        dynamic_ncols=True, mininterval=1.0, disable=not world.is_main)
        try:
            for step in progress:
                if step % c.eval_interval == 0:
                    validate(step)
                metrics = self.train_step(step)
                if metrics.get("skipped"):
                    self.skipped_in_a_row += 1
                    say(f"step {step + 1}: skipped (loss {metrics['loss']}, gradient norm {metrics['grad_norm']}), "
                        f"{self.skipped_in_a_row} in a row")
                    if self.skipped_in_a_row >= c.max_skipped_steps:
                        log.write(step + 1, **metrics)
                        raise TrainingDiverged(
                            f"stopped at step {step + 1}: {self.skipped_in_a_row} steps in a row had a non-finite loss "
                            f"or gradient norm (--max-skipped-steps {c.max_skipped_steps}); resume from the last "
                            f"checkpoint with a lower --lr, or check the data")
                else:
                    self.skipped_in_a_row = 0
                    spike = self.spikes(metrics["loss"])
                    if spike is not None:
                        metrics["loss_spike_sigmas"] = spike
                        say(f"step {step + 1}: loss spike {metrics['loss']:.4f}, {spike:.1f} standard deviations "
                            "above the last steps' mean")
                log.write(step + 1, **metrics)
                progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:,.0f}")
                if (step + 1) % c.checkpoint_interval == 0 or step + 1 == c.steps:
                    state = {"step": step + 1, "tokens": self.stages.position(step + 1),
                             "skipped_in_a_row": self.skipped_in_a_row, "loss_history": self.spikes.history}
                    save_checkpoint(self.out, step + 1, self.model, self.optimizer, state, self.data.tokenizer,
                                    world, c.keep_checkpoints)
            progress.close()
            val_bpb = validate(c.steps)
        finally:
            log.close()
        final = self.out / LATEST_LINK
        model = RingLinearForCausalLM.from_pretrained(final) if world.is_main else None
        return TrainResult(model, self.data.tokenizer, val_bpb, final)


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Train in this process: alone, or as one of the processes torchrun started."""
    with process_group(resolve_device(config.device)) as world:
        return Trainer(config, world, resume).fit()
