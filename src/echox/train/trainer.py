"""One training loop for every EchoX stage, on Hugging Face `accelerate`.

Stages differ only in what they pass in: which parts train, which dataset and collator, and
which task the model's `forward(batch, task)` runs (see `echox.train.stages`). The loop owns
gradient accumulation, mixed precision, the LR schedule, clipping, evaluation, atomic
checkpoints (keep last K), exact resume (model, optimizer, scheduler, RNG, data position),
progress, TensorBoard and a loss-curve PNG.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from echox.config import MAX_THREADS
from echox.errors import CheckpointError, ConfigError, StageError
from echox.fileio import atomic_write_text, clear_interrupted, json_lines
from echox.hub import cache_dir
from echox.model.checkpoint import (check_save_folder, load_weights, option_folder,
                                    trained_parts_left_out, verify_checkpoint)
from echox.model.echox import EchoX
from echox.model.precision import cpu_has_fast_bf16

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
BEST_FILE = "best.json"  # in <output_dir>/best: {"step", "eval_loss"}
# TrainConfig fields that change what a step computes; `--resume` names those that differ
# from the checkpoint's (lr and weight_decay stay the checkpoint's: its optimizer holds them)
RESUME_SETTINGS = ("max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps",
                   "schedule", "max_grad_norm", "precision", "ctc_only", "ctc_vocab",
                   "group_by_length", "group_pool", "seed", "cut_segments", "pseudo_labels",
                   "target", "freeze_s2t")
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # ours -> accelerate's


@dataclass
class TrainConfig:
    stage: str = "s2t"  # s2t | t2c | echo
    output_dir: str = "runs/s2t"
    max_steps: int = 100  # optimizer steps
    # Stop this run after this many minutes (0 = no limit) and save the final model as if
    # max_steps were reached: a fixed slice of a rented GPU. The schedule still runs over
    # max_steps, so set max_steps to what fits (recipes/tiny/device measures it first).
    max_minutes: float = 0.0
    batch_size: int = 4  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0
    # fp32 | bf16 | fp16: autocast through accelerate's mixed precision (bf16 runs on CPUs
    # with AVX512-BF16 / AMX too; on other CPUs it falls back to fp32, see
    # effective_precision); weights and optimizer states stay float32
    precision: str = "fp32"
    # Read the frozen speech encoder's outputs from a disk cache keyed by clip content and
    # encoder (echox.model.feature_cache): each clip is encoded once, not once per epoch
    cache_encoder: bool = False
    # Stage I only: train the adapter on the CTC loss alone, never running the LLM (a cheap
    # pre-training of the adapter on ASR audio; LoRA does not change)
    ctc_only: bool = False
    # Stage I: "transcripts" runs the CTC softmax over the token ids of the training
    # transcripts only (`adapter.ctc_vocab`, kept in the checkpoint) instead of the LLM's
    # whole vocabulary; "" keeps the model's own CTC vocabulary
    ctc_vocab: str = ""
    # Stages I and III: the tokens every row of a batch starts with (system prompt, chat
    # template) run once per batch, their KV cache shared by the rows; the same loss and
    # gradients (tested), less LLM work (docs/training.md). Off only to measure it.
    share_prompt: bool = True
    # The LLM's attention kernel while training ("" = the model's, transformers' sdpa): on a
    # CPU, "eager" (plain matmuls) trains short sequences faster, since the sdpa kernel's
    # backward is slow there (docs/training.md). Inference is not affected.
    llm_attention: str = ""
    encoder_cache_dir: str | None = None  # default $ECHOX_CACHE/encoder-features
    # Batches of examples of similar length (less padding): each epoch's shuffle is cut into
    # pools of `group_pool` batches, sorted by length inside a pool, and the batches shuffled
    group_by_length: bool = False
    group_pool: int = 32
    eval_every: int = 0  # 0 = only at the end (when eval data is given)
    eval_batches: int = 0  # 0 = the whole eval set
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    # Also keep the model of the lowest eval loss seen so far in <output_dir>/best (its
    # best.json gives the step and loss): a stage that overfits hands on its best point
    keep_best: bool = False
    log_every: int = 1
    seed: int = 0
    num_workers: int = 0
    # torch intra-op threads per process (0 = torch's default). On a shared CPU, more threads
    # than free cores slows training down by an order of magnitude: set 1 per process there.
    threads: int = 0
    # Stage III
    cut_segments: bool = True  # cut responses where the streaming trigger would
    pseudo_labels: str = "online"  # online | offline (precomputed + cached)
    target: str = "pseudo"  # pseudo | gold-units (the baseline)
    # Stage III with the S2T model (adapter + LoRA) frozen and no L_S2T term: its response
    # states H are computed once per dialogue (cached in <output_dir>/states, keyed by the S2T
    # weights) and a step runs only the denoising adapter and the echo decoder. Ours, not the
    # paper's (whose total loss trains the S2T too): far cheaper on a CPU (docs/training.md)
    freeze_s2t: bool = False
    # Stage III: dialogues per batch when the frozen S2T model's states and the offline
    # pseudo-labels are computed before training (0 = 8 and 16, sized for a CPU; a GPU takes
    # hundreds)
    precompute_batch: int = 0

    def __post_init__(self) -> None:
        def check(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"train.{key}: {msg}")

        check(self.stage in ("s2t", "t2c", "echo"), "stage", f"must be s2t, t2c or echo; got {self.stage!r}")
        for k in ("max_steps", "batch_size", "grad_accum", "keep_last", "log_every"):
            check(getattr(self, k) >= 1, k, f"must be >= 1, got {getattr(self, k)}")
        for k in ("eval_every", "eval_batches", "save_every", "warmup_steps", "num_workers", "threads",
                  "precompute_batch"):
            check(getattr(self, k) >= 0, k, f"must be >= 0, got {getattr(self, k)}")
        check(self.threads <= MAX_THREADS, "threads", f"must be <= {MAX_THREADS}, got {self.threads}")
        check(0 < self.lr < math.inf, "lr", f"must be a finite number > 0, got {self.lr}")
        check(0 <= self.weight_decay < math.inf, "weight_decay",
              f"must be a finite number >= 0, got {self.weight_decay}")
        check(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        check(0 <= self.max_grad_norm < math.inf, "max_grad_norm",  # NaN turned clipping off
              f"must be a finite number >= 0 (0: no clipping), got {self.max_grad_norm}")
        check(self.max_minutes >= 0, "max_minutes", f"must be >= 0, got {self.max_minutes}")
        check(self.schedule in ("cosine", "linear", "constant"), "schedule", "cosine | linear | constant")
        check(self.precision in PRECISIONS, "precision", f"fp32 | bf16 | fp16; got {self.precision!r}")
        check(self.group_pool >= 1, "group_pool", f"must be >= 1, got {self.group_pool}")
        check(self.pseudo_labels in ("online", "offline"), "pseudo_labels", "online | offline")
        check(not self.freeze_s2t or self.stage == "echo", "freeze_s2t", "applies to stage echo only")
        check(self.ctc_vocab in ("", "transcripts"), "ctc_vocab", f"'' or 'transcripts'; got {self.ctc_vocab!r}")
        check(self.target in ("pseudo", "gold-units"), "target", "pseudo | gold-units")
        check(self.llm_attention in ("", "eager", "sdpa"), "llm_attention",
              f"'', eager or sdpa; got {self.llm_attention!r}")


def step_of(folder: Path) -> int:
    """The step of a `checkpoints/step-N` folder (-1 for another name): folders are ordered by
    it, not by name (`step-1000000` sorts before `step-999999` as text)."""
    digits = folder.name.removeprefix("step-")
    return int(digits) if folder.name.startswith("step-") and digits.isdigit() else -1


def checkpoint_folders(out: Path) -> list[Path]:
    """`out/checkpoints/step-*`, oldest step first."""
    return sorted((out / "checkpoints").glob("step-*"), key=step_of)


def check_no_checkpoints(out: Path, resuming: bool = False) -> None:
    """Refuse to start a run in a folder that holds another run's checkpoints: its steps would
    be overwritten or mixed with the new ones. `resuming`: every checkpoint there is broken."""
    steps = [p.name for p in checkpoint_folders(out)]
    if not steps:
        return
    if resuming:
        raise CheckpointError(f"--resume: none of the checkpoints in {out / 'checkpoints'} "
                              f"({', '.join(steps)}) is complete; remove them to start afresh "
                              "there, or give a new --out")
    raise CheckpointError(f"{out} holds the checkpoints of an earlier run (last {steps[-1]}); "
                          "pass --resume to continue it, or give a new --out")


def check_run_folder(out: Path, keep_best: bool = False) -> None:
    """Refuse, before the model is built and the data read, an output folder where what a run
    writes is taken by something else: a folder where it writes a file (recipe.json,
    metrics.jsonl, loss_curve.png) or the reverse, a `model/` (or, with `keep_best`, `best/`)
    that holds other files than a checkpoint (saving replaces it whole), or a recipe.json that
    no run wrote (a run writes its own over it)."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        # a model's own folder (runs/x/model): the run's folders went into it, beside the weights
        raise ConfigError(f"--out {out} is a model checkpoint folder, not a run folder; give "
                          "a new --out (the run writes its model into <out>/model)")
    for name in ("recipe.json", "metrics.jsonl", "loss_curve.png", "pseudo_labels.jsonl"):
        if (out / name).is_dir():
            raise ConfigError(f"--out {out}: {out / name} is a folder, where a run writes a file; "
                              "give another --out")
    for name in ("checkpoints", "tb", "model", "best", "states"):  # states: Stage III's cache
        if (out / name).exists() and not (out / name).is_dir():
            raise ConfigError(f"--out {out}: {out / name} is a file, where a run writes a folder; "
                              "give another --out")
    for name in ("model", "best") if keep_best else ("model",):
        check_save_folder(out / name)
    recipe = out / "recipe.json"
    for name in ("metrics.jsonl", "loss_curve.png"):
        if (out / name).is_file() and not recipe.is_file():  # `echox train` writes it first
            raise ConfigError(f"--out {out}: its {name} was not written by `echox train`, and "
                              "a run would rewrite it; give another --out")
    if recipe.is_file():
        try:
            rec = json.loads(recipe.read_text())
        except (OSError, ValueError, RecursionError):
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("train"), dict)):
            raise ConfigError(f"--out {out}: its recipe.json was not written by `echox train`, and "
                              "a run would replace it; give another --out")


def check_enough_examples(n: int, batch_size: int, world: int) -> None:
    """At least one global batch of `n` examples (`world` processes of `batch_size`)."""
    if n < batch_size * world:
        raise ConfigError(f"{n} examples are fewer than one global batch ({batch_size} x {world} "
                          "processes): give more data or a smaller train.batch_size")


class ShardedBatches(Sampler[list[int]]):
    """Seeded per-epoch shuffle, cut into global batches, each process taking its slice.

    With `lengths`, batches group examples of similar length: the shuffle is cut into pools of
    `pool` global batches, each pool is sorted by length (longest first) and cut into
    batches, and the batches of the epoch are shuffled again. Its position (epoch, batch
    index) is explicit state, so a resumed run sees exactly the batches the interrupted one
    would have seen.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int,
                 lengths: Sequence[int] | None = None, pool: int = 32) -> None:
        check_enough_examples(n, batch_size, world)
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} examples")
        self.n, self.bs, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.lengths, self.pool = (list(lengths) if lengths is not None else None), pool
        self.epoch, self.index = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.bs * self.world)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.index

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of an epoch, in order (a pure function of seed and epoch)."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        gb = self.bs * self.world
        perm = perm[: self.batches_per_epoch * gb]
        if self.lengths is None:
            return [perm[i:i + gb] for i in range(0, len(perm), gb)]
        batches = []
        for p0 in range(0, len(perm), gb * self.pool):
            pool = sorted(perm[p0:p0 + gb * self.pool], key=lambda i: -self.lengths[i])
            batches += [pool[i:i + gb] for i in range(0, len(pool), gb)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        while self.index < self.batches_per_epoch:
            chunk = batches[self.index]
            self.index += 1
            yield chunk[self.rank * self.bs:(self.rank + 1) * self.bs]
        self.epoch, self.index = self.epoch + 1, 0


@dataclass
class TrainResult:
    step: int
    first_loss: float
    last_loss: float
    steps_per_s: float
    output_dir: Path
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    stopped_by: int = 0  # the signal (`Trainer.request_stop`) that ended the run before max_steps
    last_checkpoint: tuple[int, Path] | None = None  # (step, folder) a run stopped here resumes from


def _rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout on a GPU draws from its own generators
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    cuda = st.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _complete(folder: Path) -> bool:
    try:
        verify_checkpoint(folder)
    except CheckpointError:
        return False
    return (folder / STATE_FILE).is_file()


def _free(path: Path) -> Path:
    """`path`, or `name-2`, `name-3`, ... beside it where that is taken."""
    target, n = path, 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return target


def _rename_free(folder: Path, name: str) -> Path:
    """Rename `folder` to `name` beside it (`name-2`, ... where taken); the new path."""
    target = _free(folder.with_name(name))
    folder.rename(target)
    return target


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    """Newest `checkpoints/step-*` that verifies; broken ones are skipped with a warning."""
    ckpts = checkpoint_folders(output_dir)[::-1]
    for c in ckpts:
        try:
            verify_checkpoint(c)
            if (c / STATE_FILE).is_file():
                return c
        except CheckpointError as e:
            log.warning("skipping a broken checkpoint: %s", e)
    return None


def remove_stale_saves(out: Path) -> None:
    """Clear what a save killed midway left in a run folder (`fileio.clear_interrupted`)."""
    for folder, name in ((out / "checkpoints", "step-*"), (out, "model"), (out, "best")):
        clear_interrupted(folder, name)


def _ignore_stop_signals(worker_id: int) -> None:
    """In a DataLoader worker: a SIGTERM sent to the whole process group (a preempted job,
    `systemctl stop`) is left to the main process, which stops after its step and saves; a
    worker killed by it would end the run with an error instead. Ctrl-C reaches the whole
    foreground group too: a worker would run the stop handler it was forked with (and print its
    line again). Workers exit with their parent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def effective_precision(precision: str, *, cuda: bool | None = None) -> str:
    """The precision a run really uses: bf16 asked for on a CPU without native bf16 falls back
    to fp32 (with a warning), because emulated bf16 autocast makes a step many times slower."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    if precision == "bf16" and not cuda and not cpu_has_fast_bf16():
        log.warning("train.precision=bf16, but this CPU has no native bfloat16 (AVX512-BF16 or "
                    "AMX): training in fp32 instead, which is far faster here")
        return "fp32"
    return precision


def _release_single_process_state(mixed_precision: str) -> None:
    """accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with
    another precision. A single process (tests, `bench/train_speed.py`) may build several
    trainers in turn, so there a state with another precision is cleared first; distributed
    runs keep theirs."""
    from accelerate.state import AcceleratorState

    st = AcceleratorState._shared_state
    if st and not AcceleratorState().use_distributed and str(st.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state()


def encoder_cache_root(cfg: TrainConfig) -> Path:
    """Where `train.cache_encoder` keeps encoder outputs."""
    return Path(cfg.encoder_cache_dir) if cfg.encoder_cache_dir else cache_dir() / "encoder-features"


def heap_trimmer() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None off glibc.

    A CPU step allocates and frees activations whose sizes change with every batch (utterances
    of every length). glibc keeps freed memory on its heap, and past buffers of 128 KiB it
    raises the size above which it maps memory instead; the heap then fragments and a
    process's memory grows with each new shape. A Stage III run on 7,300 dialogues grew by
    about 35 MB a step until the kernel killed it at 16.7 GB (docs/results.md, session 29).
    Trimming after each step hands the freed pages back.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # no libc to load, or one without malloc_trim (musl, macOS)
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


class Trainer:
    def __init__(
        self,
        model: EchoX,
        cfg: TrainConfig,
        train_data: Dataset,
        collate_fn: Callable[[list[Any]], Any],
        eval_data: Dataset | None = None,
        step_kwargs: dict[str, Any] | None = None,
        task: str | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        self.cfg = cfg
        self.task = task or cfg.stage
        self.step_kwargs = dict(step_kwargs or {})
        if cfg.stage in ("s2t", "echo"):
            self.step_kwargs["share_prompt"] = cfg.share_prompt
        self.out = Path(cfg.output_dir)
        self.precision = effective_precision(cfg.precision)
        _release_single_process_state(PRECISIONS[self.precision])
        self.acc = Accelerator(
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision=PRECISIONS[self.precision],
            # No accelerator here: run (and under `accelerate launch`/torchrun, distribute) on
            # CPU processes with gloo.
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
                and self.acc.distributed_type != DistributedType.FSDP):
            # accelerate shards only on GPUs/accelerators: on CPU it silently runs an FSDP
            # launch config as plain DDP (torch's FSDP1 refuses CPU too). Say so instead.
            raise ConfigError(
                "an FSDP launch config was given, but accelerate runs this job as "
                f"{self.acc.distributed_type.value} on {self.acc.device.type}, unsharded: FSDP "
                "through accelerate needs GPUs. On CPU launch with recipes/accelerate/ddp.yaml"
            )
        if cfg.stage not in model.trained_stages:
            model.trained_stages.append(cfg.stage)
        if cfg.llm_attention:
            model.llm.base.set_attn_implementation(cfg.llm_attention)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"stage {cfg.stage}: no trainable parameters")
        self.n_params = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        from transformers import get_scheduler

        sched = get_scheduler(
            "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule,
            opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps,
        )
        # The scheduler stays unprepared: it steps once per optimizer step, whatever the
        # number of processes (accelerate would step it once per process).
        self.model, self.opt = self.acc.prepare(model, opt)
        self.sched = sched
        lengths = None
        if cfg.group_by_length:
            if not hasattr(train_data, "length"):
                raise ConfigError("train.group_by_length: this dataset has no length(i) to group by")
            lengths = [train_data.length(i) for i in range(len(train_data))]  # type: ignore[arg-type, attr-defined]
        self.sampler = ShardedBatches(
            len(train_data), cfg.batch_size, self.acc.process_index, self.acc.num_processes, cfg.seed,
            lengths=lengths, pool=cfg.group_pool,
        )
        if cfg.cache_encoder and getattr(model, "feature_cache", None) is None:
            model.enable_feature_cache(encoder_cache_root(cfg))
        # each loader has its own generator: a new iterator draws its workers' base seed from
        # it, not from the global RNG, so a run resumed mid-epoch (one iterator more) draws the
        # same dropout masks as an uninterrupted one
        self.loader = DataLoader(train_data, batch_sampler=self.sampler, collate_fn=collate_fn,
                                 num_workers=cfg.num_workers,
                                 worker_init_fn=_ignore_stop_signals if cfg.num_workers else None,
                                 generator=torch.Generator().manual_seed(cfg.seed))
        self.eval_loader = None
        if eval_data is not None and len(eval_data) > 0:
            self.eval_loader = DataLoader(eval_data, batch_size=cfg.batch_size, shuffle=False,
                                          collate_fn=collate_fn,
                                          generator=torch.Generator().manual_seed(cfg.seed))
        self.step = 0
        self.writer = None
        self.best: tuple[int, float] | None = None  # (step, eval loss) of <out>/best
        # a roll back: the step resumed from and this folder's later complete checkpoints
        self._roll_back: tuple[int, list[Path]] | None = None
        self.stop_signal = 0  # set by `request_stop`
        self._finishing = False  # the last step is made: the final save and eval are running
        self._pid = os.getpid()  # a forked copy (a DataLoader worker) does not speak for the run
        self.last_checkpoint: tuple[int, Path] | None = None  # (step, folder) saved or resumed from

    # ---- checkpoints ---------------------------------------------------------------------
    def _save(self, final: bool = False) -> Path:
        self.acc.wait_for_everyone()
        self._set_aside_later()
        folder = self.out / "checkpoints" / f"step-{self.step:06d}"
        full_state = self.acc.get_state_dict(self.model)  # collective under FSDP / ZeRO-3
        if self.acc.is_main_process:
            state = {
                "step": self.step, "epoch": self.sampler.epoch, "index": self.sampler.index,
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "train_config": self._run_args(), "num_processes": self.acc.num_processes,
            }
            unwrapped = self.acc.unwrap_model(self.model)
            # `replace`: a step folder already there is this run's own, skipped on resume as
            # broken (a config.json cut by a kill, say); the new one takes its place
            rng = _rng_state()

            def extra(tmp: Path) -> None:  # the main process's RNG state inside the atomic save
                torch.save(state, tmp / STATE_FILE)
                torch.save(rng, tmp / f"rng_state_{self.acc.process_index}.pt")

            unwrapped.save_pretrained(
                folder,
                extra_files={"training_args.json": json.dumps(self._run_args(), indent=2)},
                extra_writer=extra, full_state=full_state, replace=folder.is_dir(),
            )
            for old in checkpoint_folders(self.out)[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:  # the other ranks' states beside it (a kill can cut them)
            torch.save(_rng_state(), folder / f"rng_state_{self.acc.process_index}.pt")
        self.acc.wait_for_everyone()
        self.last_checkpoint = (self.step, folder)
        if final and self.acc.is_main_process:  # the stage's output for the next stage
            self.acc.unwrap_model(self.model).save_pretrained(
                self.out / "model",
                extra_files={"training_args.json": json.dumps(self._run_args(), indent=2)},
                full_state=full_state,
            )
        self.acc.wait_for_everyone()
        return folder

    def _run_args(self) -> dict[str, Any]:
        """The run's settings as saved with its checkpoints: the config, with the lr and weight
        decay the optimizer runs with (after a resume with another --lr, the checkpoint's)."""
        return asdict(self.cfg) | self.optimizer_settings()

    def _read_best(self) -> tuple[int, float] | None:
        try:
            rec = json.loads((self.out / "best" / BEST_FILE).read_text())
            return int(rec["step"]), float(rec["eval_loss"])
        except (OSError, ValueError, RecursionError, KeyError, TypeError):
            return None

    def _save_best(self, ev: float) -> None:
        """Write <out>/best when `ev` is the lowest eval loss so far (`train.keep_best`); a loss
        that is not finite never is (NaN compares false with everything: it replaced the best)."""
        if not math.isfinite(ev):
            log.warning("step %d: the eval loss is %s; %s/best is kept as it is", self.step, ev, self.out)
            return
        if self.best is not None and ev >= self.best[1]:
            return
        self._set_aside_later()  # before best/ is written: the abandoned one goes aside first
        self.best = (self.step, ev)
        full_state = self.acc.get_state_dict(self.model)
        if self.acc.is_main_process:
            self.acc.unwrap_model(self.model).save_pretrained(
                self.out / "best",
                extra_files={"training_args.json": json.dumps(self._run_args(), indent=2),
                             BEST_FILE: json.dumps({"step": self.step, "eval_loss": ev})},
                full_state=full_state,
            )
        self.acc.wait_for_everyone()

    def _resume(self, resume: str | Path) -> None:
        if str(resume) == "latest":
            folder = find_latest_checkpoint(self.out)
            if folder is None:
                check_no_checkpoints(self.out, resuming=True)
                log.warning("--resume latest: no checkpoint in %s; starting fresh", self.out)
                return
        else:
            folder = option_folder("--resume", resume)
            if (folder / "checkpoints").is_dir() and not (folder / "config.json").exists():
                run = folder  # a run folder: its newest complete checkpoint
                folder = find_latest_checkpoint(run)
                if folder is None:
                    raise CheckpointError(f"cannot resume from {run}: no complete checkpoint in "
                                          f"{run / 'checkpoints'}")
            verify_checkpoint(folder)
        if not (folder / STATE_FILE).is_file():
            raise CheckpointError(f"cannot resume: {folder / STATE_FILE} is missing")
        try:
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - torch.load raises many kinds on a damaged file
            raise CheckpointError(f"cannot resume: {folder / STATE_FILE} is not readable "
                                  f"({type(e).__name__}: {e})") from e
        counters = [state.get(k) for k in ("step", "epoch", "index")] if isinstance(state, dict) else []
        if not (isinstance(state, dict) and isinstance(state.get("train_config") or {}, dict)
                and all(type(v) is int and 0 <= v < 2**40 for v in counters)):
            raise CheckpointError(f"cannot resume: {folder / STATE_FILE} is not a trainer state "
                                  "(a train_config mapping and whole step, epoch and index counters)")
        was = (state.get("train_config") or {}).get("stage")
        if was is not None and was != self.cfg.stage:
            raise CheckpointError(f"cannot resume stage {self.cfg.stage} from {folder}: it is a "
                                  f"checkpoint of stage {was}")
        lost = trained_parts_left_out(self.acc.unwrap_model(self.model), folder)
        if lost:
            raise CheckpointError(f"cannot resume from {folder}: it leaves out the "
                                  f"{' and '.join(lost)} weights this stage trains (an older "
                                  "echox saved them so); start the run again in a new --out")
        load_weights(self.acc.unwrap_model(self.model), folder)
        self._warn_changed_settings(state.get("train_config") if isinstance(state, dict) else None)
        try:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            self.sampler.epoch, self.sampler.index = int(state["epoch"]), int(state["index"])
            was = state.get("num_processes")
            was_bs = (state.get("train_config") or {}).get("batch_size", self.cfg.batch_size)
            now = self.cfg.batch_size * self.acc.num_processes
            if (type(was) is int and was > 0 and type(was_bs) is int and was_bs > 0
                    and was_bs * was != now):
                # the saved position counts global batches of was_bs x was: read it as the
                # examples done, not as batches of another size
                done = self.sampler.index * was_bs * was
                self.sampler.index = min(done // now, self.sampler.batches_per_epoch)
                log.warning("--resume: the checkpoint's global batch was %d x %d processes, this "
                            "run's is %d x %d; the epoch goes on after about the %d examples done "
                            "(batch %d of %d), and its batches are not those an uninterrupted run "
                            "would have made (with length grouping, which examples come next "
                            "differs too)", was_bs, was, self.cfg.batch_size,
                            self.acc.num_processes, done, self.sampler.index,
                            self.sampler.batches_per_epoch)
        except (KeyError, TypeError, ValueError) as e:  # another run's trainable parameters
            raise CheckpointError(f"cannot resume from {folder}: its optimizer state does not fit "
                                  f"this run's trainable parameters ({e})") from e
        rng = folder / f"rng_state_{self.acc.process_index}.pt"
        restored = False
        if rng.is_file() and state.get("num_processes") == self.acc.num_processes:
            try:  # another rank's is written after the checkpoint: a kill can cut it
                _set_rng_state(torch.load(rng, weights_only=False))
                restored = True
            except Exception as e:  # noqa: BLE001 - whatever is wrong with it, go on without it
                log.warning("unreadable RNG state %s (%s: %s)", rng, type(e).__name__, e)
        if not restored:
            log.warning("no RNG state for this process in %s; dropout noise will differ", folder)
        # every process reads the same folder here; nothing is renamed before the first save
        later = [c for c in checkpoint_folders(self.out) if step_of(c) > self.step and _complete(c)]
        self.best = self._read_best()
        if later:  # a roll back: the later saves go aside at this run's first save
            self._roll_back = (self.step, later)
            metrics = self.out / "metrics.jsonl"
            if self.acc.is_main_process and metrics.is_file():  # its rows past step N, kept
                shutil.copyfile(metrics, _free(self.out / f"metrics-abandoned-after-step-{self.step:06d}"
                                               ".jsonl"))
            if self.best is not None and self.best[0] > self.step:
                self.best = None  # of the abandoned steps: not the bar for this run's evals
        self.last_checkpoint = (self.step, folder)
        self._drop_metrics_after(self.step)
        self.acc.print(f"resumed from {folder} at step {self.step}")

    def _warn_changed_settings(self, was: Any) -> None:
        """Name the settings of `RESUME_SETTINGS` that differ from the checkpoint's."""
        if not isinstance(was, dict):
            return
        now = asdict(self.cfg)
        changed = [f"{k} {was[k]!r} -> {now[k]!r}" for k in RESUME_SETTINGS if k in was and was[k] != now[k]]
        if changed:
            log.warning("--resume: the checkpoint was trained with other settings (%s); the run "
                        "goes on with the new ones, except lr and weight_decay, which stay the "
                        "checkpoint's", ", ".join(changed))

    def _set_aside_later(self) -> None:
        """A resume from step N of a run whose folder holds later checkpoints (a roll back to an
        older one) abandons them: they would be taken as the run's latest by the next --resume
        and kept over its new ones by keep_last. At the resumed run's first save (of a
        checkpoint or best/; a run stopped before it leaves the folder as it was), they, and a
        best/ of a later step, are renamed `abandoned-...` (not deleted) and named in a
        warning."""
        roll_back, self._roll_back = self._roll_back, None
        if roll_back is None or not self.acc.is_main_process:
            return
        step, later = roll_back  # found complete at the resume (a broken one is replaced)
        moved = [_rename_free(c, f"abandoned-{c.name}") for c in later if c.is_dir()]
        best = self._read_best()
        # with no later checkpoint, a later best/ is of the same steps, made again exactly
        if moved and best is not None and best[0] > step:
            moved.append(_rename_free(self.out / "best", f"best-abandoned-step-{best[0]:06d}"))
        if moved:
            log.warning("--resume from step %d: the later saves of this run folder are set aside, "
                        "not used: %s", step, ", ".join(str(m) for m in moved))

    def _drop_metrics_after(self, step: int) -> None:
        """Forget the logged rows of the steps after `step` (an interrupted run logged them past
        its last checkpoint; the resumed run logs them again)."""
        path = self.out / "metrics.jsonl"
        if not self.acc.is_main_process or not path.is_file():
            return
        kept = []
        for _, rec, error in json_lines(path):
            try:
                if error is not None or int(rec.get("step", 0)) > step:
                    continue  # a line cut by the interruption, or a step to be logged again
            except (ValueError, TypeError, AttributeError):
                continue
            kept.append(json.dumps(rec) + "\n")
        atomic_write_text(path, "".join(kept))

    # ---- loop ----------------------------------------------------------------------------
    def _batches(self) -> Iterator[Any]:
        while True:
            yield from self.loader

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.eval_loader is None:
            return None
        self.model.eval()
        tot, n = 0.0, 0
        for i, batch in enumerate(self.eval_loader):
            if self.cfg.eval_batches and i >= self.cfg.eval_batches:
                break
            out = self.model(batch.to(self.acc.device), task=self.task, **self.step_kwargs)
            tot += out.loss.item()
            n += 1
        self.model.train()
        val = torch.tensor([tot / max(n, 1)], device=self.acc.device)
        return float(self.acc.gather(val).mean())

    def _log(self, rec: dict[str, Any]) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.writer is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, rec["step"])

    def _out_of_time(self, t0: float) -> bool:
        """Whether `train.max_minutes` has passed since `t0`, decided by the main process's
        clock so that every process stops at the same step."""
        if not self.cfg.max_minutes:
            return False
        late = float(time.time() - t0 >= 60.0 * self.cfg.max_minutes)
        flag = torch.tensor([late if self.acc.is_main_process else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    def optimizer_settings(self) -> dict[str, float]:
        """The lr and weight decay the optimizer runs with: after `--resume`, the checkpoint's
        (its optimizer state holds them), whatever the config now says."""
        group = self.opt.param_groups[0]
        return {"lr": float(group.get("initial_lr", group["lr"])),
                "weight_decay": float(group["weight_decay"])}

    def request_stop(self, signum: int, frame: Any = None) -> None:
        """A handler for SIGINT and SIGTERM: the run stops after the step (and the save) in
        progress, every process at the same step, and saves a checkpoint of that step. Ctrl-C
        again interrupts at once."""
        if self.stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.stop_signal and self.acc.is_main_process and os.getpid() == self._pid:
            # os.write, not print: a handler can run inside tqdm's own write to stderr
            again = "; Ctrl-C again stops at once" if signum == signal.SIGINT else ""
            what = ("the last step is made: finishing the final save and eval" if self._finishing
                    else "stopping after the step in progress, with a checkpoint of it")
            with contextlib.suppress(OSError):
                os.write(2, f"\nechox train: {signal.Signals(signum).name}: {what}{again}\n".encode())
        self.stop_signal = self.stop_signal or signum

    def _stop_requested(self) -> int:
        """The signal that asked any process to stop, or 0: the same on every process."""
        got = torch.tensor([self.stop_signal], device=self.acc.device)
        return int(self.acc.gather(got).max())

    def train(self, resume: str | Path | None = None, stop_at: int | None = None,
              on_start: Callable[[], None] | None = None) -> TrainResult:
        """Run to `max_steps`, or pause after step `stop_at` (saved there: `resume` goes on).

        `on_start` runs once the run can start: after `resume` was loaded, before the first
        step (`echox train` records the run's recipe there, so a refused resume changes nothing)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed + self.acc.process_index)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self._finishing = False
        self.out.mkdir(parents=True, exist_ok=True)
        if self.acc.is_main_process:
            remove_stale_saves(self.out)
        self.acc.wait_for_everyone()  # every process then finds the same checkpoints
        if resume is None:
            check_no_checkpoints(self.out)
        else:
            self._resume(resume)
        if on_start is not None:
            on_start()
        if self.step == 0:  # rows of an earlier run here that was stopped before a checkpoint
            self._drop_metrics_after(0)
        if self.acc.is_main_process:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tb"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.writer = None
        self.model.train()
        end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
        if stop_at is not None and self.step >= stop_at and self.step < cfg.max_steps:
            log.warning("--stop-at %d: the run is already at step %d; nothing is trained (give a "
                        "later step, or leave --stop-at out to go on to %d)", stop_at, self.step,
                        cfg.max_steps)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.acc.is_main_process,
                   desc=f"train {cfg.stage}", dynamic_ncols=True)
        first = last = float("nan")
        evals: list[tuple[int, float]] = []
        t0, steps0, samples = time.time(), self.step, 0
        batches = self._batches()
        timed_out, stop = False, 0
        trim = heap_trimmer() if self.acc.device.type == "cpu" else None
        try:  # an error mid-run ends the bar's line first: its message gets a line of its own
            while self.step < end and not timed_out and not stop:
                acc_loss, acc_metrics = 0.0, {}
                lr = self.sched.get_last_lr()[0]  # this step's (the scheduler steps within it)
                for _ in range(cfg.grad_accum):
                    batch = next(batches).to(self.acc.device)
                    with self.acc.accumulate(self.model), self.acc.autocast():
                        out = self.model(batch, task=self.task, **self.step_kwargs)
                        self.acc.backward(out.loss)
                        if self.acc.sync_gradients and cfg.max_grad_norm > 0:
                            self.acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                        self.opt.step()
                        if self.acc.sync_gradients:
                            self.sched.step()
                        self.opt.zero_grad()
                    acc_loss += out.loss.item() / cfg.grad_accum
                    for k, v in out.metrics.items():
                        acc_metrics[k] = acc_metrics.get(k, 0.0) + v / cfg.grad_accum
                    samples += cfg.batch_size * self.acc.num_processes
                self.step += 1
                if trim is not None:
                    trim(0)
                loss = float(self.acc.gather(torch.tensor([acc_loss], device=self.acc.device)).mean())
                if not math.isfinite(loss):  # every process sees the gathered loss: all stop
                    raise StageError(
                        f"step {self.step}: the training loss is {loss}, so the run stops and "
                        "saves nothing of this step (a too high train.lr, or a batch the model "
                        "cannot use, such as audio far louder than speech)")
                first = loss if math.isnan(first) else first
                last = loss
                dt = max(time.time() - t0, 1e-9)
                rec = {"step": self.step, "loss": loss, "lr": lr,
                       "steps_per_s": (self.step - steps0) / dt, "samples_per_s": samples / dt,
                       **{f"train/{k}": v for k, v in acc_metrics.items()}}
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    ev = self.evaluate()
                    if ev is not None:
                        rec["eval_loss"] = ev
                        evals.append((self.step, ev))
                        if cfg.keep_best:
                            self._save_best(ev)
                if self.step % cfg.log_every == 0 or self.step == end:
                    self._log(rec)
                bar.set_postfix(loss=f"{loss:.3f}", sps=f"{rec['steps_per_s']:.2f}")
                bar.update(1)
                timed_out = self._out_of_time(t0)
                if (cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps
                        and not timed_out):
                    self._save()
                stop = self._stop_requested()
                paused = stop_at is not None and self.step >= end
                if ((stop or paused) and self.step < cfg.max_steps
                        and (self.last_checkpoint or (0,))[0] != self.step):
                    # a stopped run (a preempted job, Ctrl-C) or one paused by --stop-at keeps
                    # every step it made: --resume goes on from here
                    self._save()
        finally:
            bar.close()
        self._finishing = True  # a stop asked from here on still gets the final save and eval
        stopped_by = stop if self.step < cfg.max_steps else 0
        if timed_out and not stopped_by and self.acc.is_main_process:
            log.warning("train.max_minutes=%g reached at step %d of %d: saving the final model",
                        cfg.max_minutes, self.step, cfg.max_steps)
        if (self.step >= cfg.max_steps or timed_out) and not stopped_by:
            self._save(final=True)  # first: bad eval data must not cost the trained model
            if self.eval_loader is not None and not (cfg.eval_every and self.step % cfg.eval_every == 0):
                ev = self.evaluate()
                if ev is not None:
                    evals.append((self.step, ev))
                    self._log({"step": self.step, "eval_loss": ev})
                    if cfg.keep_best:
                        self._save_best(ev)
            # no metrics when no step ran here (--resume from another run's final checkpoint)
            if self.acc.is_main_process and (self.out / "metrics.jsonl").is_file():
                plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss_curve.png")
        if self.writer is not None:
            self.writer.close()
        dt = max(time.time() - t0, 1e-9)
        return TrainResult(self.step, first, last, (self.step - steps0) / dt, self.out, evals,
                           stopped_by, self.last_checkpoint)


def plot_loss_curve(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for _, r, error in json_lines(metrics) if error is None and isinstance(r, dict)
            and "step" in r]  # a line torn by a kill is left out
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(metrics.parent.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def batch_list(x: Sequence[Any]) -> list[Any]:  # collate helper for list-returning datasets
    return list(x)
