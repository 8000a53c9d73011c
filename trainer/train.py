"""One training run: data -> network -> epochs -> run dir -> final test figure.

Read top to bottom: RunSpec (what to train), Environment (where: device, DDP rank),
the optimizer and schedule, Lookahead, the epoch loop, and finish_run, which writes the
run dir and then measures test accuracy with the run dir's own ServingModel in fp32 on
uint8 images, the exact module the exporter turns into ONNX.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ensemble_serving.datasets import Dataset, DatasetError, load_dataset
from ensemble_serving.metrics import expected_calibration_error, top_k_accuracy
from trainer import checkpoint, report
from trainer.data import (
    NORMALIZATION,
    Augmentation,
    InMemoryLoader,
    Normalizer,
    split_train_validation,
    to_nchw_tensor,
)
from trainer.models import build_model, count_parameters
from trainer.muon import MuonWithSGD
from trainer.serving import TTA_MODES, serving_model_from

OPTIMIZERS = ("sgd", "muon", "adam", "adamw")
SCHEDULES = ("onecycle", "cosine", "step", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class TrainerError(Exception):
    """Bad input a user can fix; the CLI prints the message on one line and exits 2."""


class TrainingInterrupted(Exception):
    """Ctrl-C: the checkpoint was saved; the message says how to resume."""


@dataclass
class RunSpec:
    dataset: str
    architecture: str
    hyper: dict  # the recipe with command-line overrides applied (see recipes.py)
    seed: int
    run_dir: Path
    val_fraction: float = 0.0
    split_seed: int = 0
    precision: str = "auto"
    channels_last: bool = True
    deterministic: bool = False
    resume: bool = False
    command: str = field(default_factory=lambda: " ".join(sys.argv))


# --------------------------------------------------------------------------- environment


@dataclass
class Environment:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise TrainerError(f"unknown device {choice!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainerError(f"device {choice!r} requested but CUDA is not available here (try --device cpu)")
    return device


def setup_environment(device_choice: str) -> Environment:
    """Single process, or one DDP rank when started by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Environment(pick_device(device_choice))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Environment(device, rank=dist.get_rank(), world_size=dist.get_world_size())


def autocast_for(device: torch.device, precision: str) -> tuple[str, contextlib.AbstractContextManager | None]:
    """(resolved precision, autocast context or None). auto = bf16 where the hardware does it."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and _cpu_has_fast_bf16():
            precision = "bf16"
        else:
            precision = "fp32"
    if precision == "fp32":
        return precision, None
    if precision == "fp16" and device.type == "cpu":
        raise TrainerError("fp16 autocast is for CUDA; on CPU use --precision bf16 or fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return precision, torch.autocast(device.type, dtype=dtype)


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def apply_determinism(seed: int, deterministic: bool, device: torch.device) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


# --------------------------------------------------------------------------- hyperparameters


def validate(spec: RunSpec, n_images: int, image_size: int, world_size: int) -> None:
    """Refuse settings that cannot train, with the one line that says why."""
    h = spec.hyper

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise TrainerError(message)

    need(0 <= spec.val_fraction < 1, f"--val-fraction must be in [0, 1), got {spec.val_fraction}")
    n_train = n_images - int(round(n_images * spec.val_fraction))
    need(isinstance(h["epochs"], int) and h["epochs"] >= 1, f"--epochs must be a whole number >= 1, got {h['epochs']}")
    need(h["batch_size"] >= 1, f"--batch-size must be >= 1, got {h['batch_size']}")
    need(h["batch_size"] % world_size == 0,
         f"--batch-size {h['batch_size']} must divide evenly over the {world_size} processes")  # fmt: skip
    need(h["batch_size"] <= n_train,
         f"--batch-size {h['batch_size']} is larger than the {n_train} training images")  # fmt: skip
    need(math.isfinite(h["lr"]) and h["lr"] > 0, f"--lr must be a positive number, got {h['lr']}")
    need(h["optimizer"] in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {h['optimizer']!r}")
    need(h["schedule"] in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {h['schedule']!r}")
    need(0 <= h["momentum"] < 1, f"--momentum must be in [0, 1), got {h['momentum']}")
    need(not (h["nesterov"] and h["optimizer"] == "sgd" and h["momentum"] == 0),
         "Nesterov SGD needs --momentum > 0 (or pass --no-nesterov)")  # fmt: skip
    need(h["muon_lr"] > 0 and 0 <= h["muon_momentum"] < 1,
         f"muon_lr must be > 0 and muon_momentum in [0, 1), got {h['muon_lr']} and {h['muon_momentum']}")  # fmt: skip
    need(isinstance(h["whiten_bias_epochs"], int) and h["whiten_bias_epochs"] >= 0,
         f"whiten_bias_epochs must be a whole number >= 0, got {h['whiten_bias_epochs']}")  # fmt: skip
    need(h["weight_decay"] >= 0, f"--weight-decay must be >= 0, got {h['weight_decay']}")
    need(0 <= h["label_smoothing"] < 1, f"--label-smoothing must be in [0, 1), got {h['label_smoothing']}")
    need(0 <= h["warmup"] <= 1, f"--warmup is a fraction of training in [0, 1], got {h['warmup']}")
    need(0 < h["step_gamma"] <= 1, f"step_gamma must be in (0, 1], got {h['step_gamma']}")
    aug = h["augmentation"]
    need(0 <= aug["translate"] < image_size, f"--translate must be in [0, {image_size}), got {aug['translate']}")
    need(0 <= aug["cutout"] <= image_size, f"--cutout must be in [0, {image_size}], got {aug['cutout']}")
    need(aug["flip"] in ("none", "random", "alternating"),
         f"--flip must be none, random or alternating, got {aug['flip']!r}")  # fmt: skip
    need(spec.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
    need(h["tta"] in TTA_MODES, f"--tta must be one of {', '.join(TTA_MODES)}, got {h['tta']!r}")
    need(h["eval_batch_size"] >= 1, f"eval_batch_size must be >= 1, got {h['eval_batch_size']}")


def lr_factor(step: int, total_steps: int, h: dict) -> float:
    """Multiplier on the base learning rate at `step` (0-based), warmup included.

    onecycle: linear from lr_start_factor up to 1 over the warmup, then linearly down
              to lr_end_factor (the triangular schedule fast CIFAR recipes use).
    cosine:   linear warmup, then half a cosine down to lr_end_factor.
    step:     linear warmup, then x step_gamma at each of step_milestones (fractions).
    """
    warmup_steps = int(round(h["warmup"] * total_steps))
    start, end = h["lr_start_factor"], h["lr_end_factor"]
    if step < warmup_steps:
        return start + (1 - start) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    schedule = h["schedule"]
    if schedule == "onecycle":
        return 1 + (end - 1) * progress
    if schedule == "cosine":
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return h["step_gamma"] ** sum(step >= m * total_steps for m in h["step_milestones"])
    return 1.0


def make_optimizer(network: nn.Module, h: dict) -> torch.optim.Optimizer:
    """Parameter groups, each with a base_lr the schedule scales:

    - BatchNorm shifts: lr x norm_bias_lr_scale, weight decay / the same (airbench);
    - the whitening conv's bias (airbench): stops learning after whiten_bias_epochs (0 = never);
      with Muon it learns at the shifts' fast rate, as in airbench94_muon;
    - conv filters, with --optimizer muon: Muon at muon_lr (see trainer/muon.py);
    - everything else: lr and weight_decay.
    """
    muon = h["optimizer"] == "muon"
    whiten = getattr(network, "whiten", None)
    shifts, whiten_bias, filters, others = [], [], [], []
    for module in network.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if module is whiten and name == "bias":
                whiten_bias.append(param)
            elif isinstance(module, nn.modules.batchnorm._NormBase) and name == "bias":
                shifts.append(param)
            elif muon and param.ndim == 4:
                filters.append(param)
            else:
                others.append(param)
    scale = h["norm_bias_lr_scale"]
    slow = {"base_lr": h["lr"], "weight_decay": h["weight_decay"]}
    fast = {"base_lr": h["lr"] * scale, "weight_decay": h["weight_decay"] / scale}
    groups = [{"params": others, **slow}, {"params": shifts, **fast},
              {"params": whiten_bias, **(fast if muon else slow), "until_epoch": h["whiten_bias_epochs"] or None},
              {"params": filters, "base_lr": h["muon_lr"], "momentum": h["muon_momentum"], "weight_decay": 0.0,
               "orthogonalize": True}]  # fmt: skip
    groups = [group for group in groups if group["params"]]
    for group in groups:
        group["lr"] = group["base_lr"]
    if muon:
        return MuonWithSGD(groups, momentum=h["momentum"])
    if h["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"])
    if h["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=h["lr"])
    return torch.optim.AdamW(groups, lr=h["lr"])


def set_lr(optimizer: torch.optim.Optimizer, factor: float, epoch: int) -> None:
    """Scale every group's base_lr by the schedule's factor; groups past their until_epoch get 0."""
    for group in optimizer.param_groups:
        until = group.get("until_epoch")
        group["lr"] = 0.0 if until is not None and epoch >= until else group["base_lr"] * factor


class Lookahead:
    """Slow weights that trail the fast ones (hlb-cifar10 / airbench style).

    Every `every` steps: slow <- slow + (1 - decay) * (fast - slow), then fast <- slow.
    The decay ramps up with training progress cubed: barely any averaging early, when
    the weights still move far, and strong averaging near the end (like weight
    averaging over the final steps). The run ends on the slow weights. Covers
    parameters and BatchNorm statistics.
    """

    def __init__(self, network: nn.Module, every: int, decay: float):
        self.every, self.decay = every, decay
        self.slow = {k: v.detach().clone() for k, v in network.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, network: nn.Module, global_step: int, total_steps: int) -> None:
        if global_step % self.every == 0:
            self._sync(network, self.decay * (global_step / total_steps) ** 3)

    @torch.no_grad()
    def finish(self, network: nn.Module) -> None:
        self._sync(network, 1.0)  # decay 1: the slow weights as they are become the model

    def _sync(self, network: nn.Module, decay: float) -> None:
        for name, fast in network.state_dict().items():
            if name in self.slow:
                slow = self.slow[name]
                slow.lerp_(fast, 1 - decay)
                fast.copy_(slow)


# --------------------------------------------------------------------------- data


@dataclass
class PreparedData:
    class_names: list[str]
    train_images: torch.Tensor  # uint8 NCHW, on the device
    train_labels: torch.Tensor
    val_images_nhwc: np.ndarray  # uint8 NHWC (what the serving model takes)
    val_labels: np.ndarray
    test: Dataset


def load_datasets(dataset: str, data_dir, download: bool) -> tuple[Dataset, Dataset]:
    try:
        return load_dataset(dataset, "train", data_dir, download), load_dataset(dataset, "test", data_dir, download)
    except DatasetError as error:
        raise TrainerError(str(error)) from None


def prepare_data(train: Dataset, test: Dataset, spec: RunSpec, device: torch.device) -> PreparedData:
    train_idx, val_idx = split_train_validation(train.labels, spec.val_fraction, spec.split_seed)
    if spec.val_fraction > 0 and len(val_idx) == 0:
        raise TrainerError(f"--val-fraction {spec.val_fraction} leaves no validation images out of {len(train)}")
    return PreparedData(
        class_names=train.class_names,
        train_images=to_nchw_tensor(train.images[train_idx]).to(device),
        train_labels=torch.from_numpy(train.labels[train_idx]).to(device),
        val_images_nhwc=train.images[val_idx],
        val_labels=train.labels[val_idx],
        test=test,
    )


@torch.no_grad()
def predict(model: nn.Module, images_nhwc: np.ndarray, device: torch.device, batch_size: int,
            autocast: contextlib.AbstractContextManager | None = None) -> np.ndarray:  # fmt: skip
    """Probabilities [N, C] (float32 numpy) from a ServingModel on uint8 NHWC images."""
    model.eval()
    outputs = []
    for start in range(0, len(images_nhwc), batch_size):
        batch = torch.from_numpy(images_nhwc[start : start + batch_size]).to(device)
        with autocast or contextlib.nullcontext():
            outputs.append(model(batch).float().cpu())
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), np.float32)


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


# --------------------------------------------------------------------------- the run


def train_run(spec: RunSpec, env: Environment, train: Dataset, test: Dataset, console) -> dict:
    """Train one model into spec.run_dir; returns its summary (and test probabilities)."""
    run_dir = spec.run_dir
    saved = checkpoint.load_training_state(run_dir) if spec.resume else None
    if spec.resume and saved is None:
        finished = _finished_config(run_dir)
        if finished is not None:
            if env.is_main:
                console.print(f"[green]{run_dir} is already complete[/]; nothing to resume.")
            return _summary_from_config(run_dir, finished, test, env)
        if env.is_main:
            console.print(f"[yellow]{run_dir} has no checkpoint to resume; starting it afresh.[/]")
    if saved is not None:
        if (saved.get("architecture"), saved.get("dataset")) != (spec.architecture, spec.dataset):
            raise TrainerError(
                f"{run_dir} holds a {saved.get('architecture')} run on {saved.get('dataset')}, not "
                f"{spec.architecture} on {spec.dataset}; resume it with the same --dataset/--arch or pick another --name"
            )
        spec.hyper = saved["hyperparameters"]  # continue exactly the run that was interrupted

    h = spec.hyper
    height, width, channels = train.images.shape[1:]
    validate(spec, len(train), height, env.world_size)
    if saved is None and (run_dir / checkpoint.CONFIG_FILE).exists() and env.is_main:
        console.print(f"[yellow]overwriting the existing run in {run_dir}[/]")
    apply_determinism(spec.seed, spec.deterministic, env.device)
    precision, autocast = autocast_for(env.device, spec.precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
    data = prepare_data(train, test, spec, env.device)
    norm = NORMALIZATION[spec.dataset]
    normalize = Normalizer(norm["mean"], norm["std"], env.device)

    network = build_model(spec.architecture, channels, len(data.class_names), height, **h["arch_args"])
    if hasattr(network, "init_whitening") and saved is None:
        # A few thousand images pin down the 2x2 patch covariance well.
        network.init_whitening(normalize(data.train_images[:5000]))
    network = network.to(env.device, memory_format=memory_format)
    optimizer = make_optimizer(network, h)
    lookahead = Lookahead(network, h["lookahead_every"], h["lookahead_decay"]) if h["lookahead"] else None
    config = _base_config(spec, data, (height, width, channels), norm, count_parameters(network))

    loader = InMemoryLoader(data.train_images, data.train_labels, h["batch_size"], Augmentation.from_dict(h["augmentation"]),
                            seed=spec.seed, rank=env.rank, world_size=env.world_size)  # fmt: skip
    total_steps = h["epochs"] * len(loader)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "train_seconds": 0.0,
             "train_cpu_seconds": 0.0}
    if saved is not None:
        network.load_state_dict(saved["network"])
        optimizer.load_state_dict(saved["optimizer"])
        if lookahead is not None and saved.get("lookahead") is not None:
            lookahead.slow = {k: v.to(env.device) for k, v in saved["lookahead"].items()}
        torch.set_rng_state(saved["rng"])
        state = {k: saved.get(k, v) for k, v in state.items()}
        if env.is_main:
            console.print(f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}")

    model = network
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(network, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=h["label_smoothing"])
    live_serving = serving_model_from(network, config)  # shares the network's weights

    def save_state() -> None:
        if env.is_main:
            checkpoint.save_training_state(run_dir, {
                **state, "network": network.state_dict(), "optimizer": optimizer.state_dict(),
                "lookahead": lookahead.slow if lookahead else None, "rng": torch.get_rng_state(),
                "hyperparameters": h, "architecture": spec.architecture, "dataset": spec.dataset,
            })  # fmt: skip

    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config["status"] = "training"
        checkpoint.write_config(run_dir, config)
        console.print(
            f"[bold]{run_dir.name}[/]: {spec.architecture} ({config['parameters']:,} params) on {spec.dataset}, "
            f"{len(data.train_labels):,} train / {len(data.val_labels):,} val images, {h['epochs']} epochs x "
            f"{len(loader)} steps, batch {h['batch_size']}, {env.device.type} {precision}"
            + (f", {env.world_size} processes" if env.distributed else "")
        )

    progress = _EpochProgress(console, enabled=env.is_main)
    set_lr(optimizer, lr_factor(state["global_step"], total_steps, h), state["global_step"] // len(loader))
    try:
        while state["epoch"] < h["epochs"]:
            epoch = state["epoch"]
            started, cpu_started = time.perf_counter(), time.process_time()
            network.train()
            totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, correct, count
            with progress.epoch(epoch, h["epochs"], len(loader), state["step_in_epoch"]) as bar:
                for images, labels in loader.epoch(epoch, start_step=state["step_in_epoch"]):
                    x = normalize(images, memory_format)
                    with autocast or contextlib.nullcontext():
                        logits = model(x)
                        loss = criterion(logits.float(), labels)
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    state["global_step"] += 1
                    state["step_in_epoch"] += 1
                    factor = lr_factor(state["global_step"], total_steps, h)
                    set_lr(optimizer, factor, state["global_step"] // len(loader))
                    if lookahead is not None:
                        lookahead.step(network, state["global_step"], total_steps)
                    with torch.no_grad():
                        totals += torch.stack([loss.detach().double() * len(labels),
                                               (logits.argmax(1) == labels).sum().double(),
                                               torch.tensor(float(len(labels)), dtype=torch.float64, device=env.device)])  # fmt: skip
                    bar.advance(totals)
            if env.distributed:
                dist.all_reduce(totals)
            epoch_seconds = time.perf_counter() - started
            state["train_seconds"] += epoch_seconds
            state["train_cpu_seconds"] += time.process_time() - cpu_started
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": float(totals[0] / totals[2]), "train_accuracy": float(totals[1] / totals[2]),
                   "val_loss": None, "val_accuracy": None, "epoch_seconds": round(epoch_seconds, 2)}  # fmt: skip
            if env.is_main and len(data.val_labels):
                probs = predict(live_serving, data.val_images_nhwc, env.device, h["eval_batch_size"], autocast)
                row["val_loss"] = nll(probs, data.val_labels)
                row["val_accuracy"] = float((probs.argmax(1) == data.val_labels).mean())
            state["history"].append(row)
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            progress.epoch_done(row)
            save_state()
    except KeyboardInterrupt:
        if env.is_main:
            save_state()
            config.update(status="interrupted", epochs_completed=state["epoch"])
            checkpoint.save_weights(run_dir, network)
            checkpoint.write_config(run_dir, config)
            report.write_history(run_dir, state["history"])
        raise TrainingInterrupted(
            f"interrupted at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}: checkpoint saved in "
            f"{run_dir}; rerun the same command with --resume to continue"
        ) from None

    if lookahead is not None:
        lookahead.finish(network)
    summary = finish_run(spec, env, network, config, data, state, precision) if env.is_main else {}
    if env.distributed:
        dist.barrier()
    return summary


def finish_run(spec: RunSpec, env: Environment, network: nn.Module, config: dict, data: PreparedData,
               state: dict, precision: str) -> dict:  # fmt: skip
    """Write the run dir, reload it, and measure with the reloaded ServingModel in fp32."""
    run_dir = spec.run_dir
    config["status"] = "complete"
    config["epochs_completed"] = state["epoch"]
    config["training"] = {
        # Wall time of the epochs (augmentation included, per-epoch validation excluded). The CPU
        # time says what the run costs when the machine is shared: ~ wall x threads when alone.
        "train_seconds": round(state["train_seconds"], 1),
        "train_cpu_seconds": round(state["train_cpu_seconds"], 1),
        "device": str(env.device), "precision": precision, "world_size": env.world_size,
        "torch_threads": torch.get_num_threads(), "channels_last": spec.channels_last,
        "cpu_count": os.cpu_count(), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    checkpoint.save_weights(run_dir, network)
    checkpoint.write_config(run_dir, config)

    serving, _ = checkpoint.load_serving_model(run_dir)
    serving.to(env.device)
    batch = spec.hyper["eval_batch_size"]
    test_probs = predict(serving, data.test.images, env.device, batch)
    metrics = {"test_accuracy": float((test_probs.argmax(1) == data.test.labels).mean()),
               "test_loss": nll(test_probs, data.test.labels),
               "test_top5_accuracy": top_k_accuracy(test_probs, data.test.labels, min(5, test_probs.shape[1])),
               "test_ece": expected_calibration_error(test_probs, data.test.labels),
               "val_accuracy": None, "val_loss": None}  # fmt: skip
    if len(data.val_labels):
        val_probs = predict(serving, data.val_images_nhwc, env.device, batch)
        metrics["val_accuracy"] = float((val_probs.argmax(1) == data.val_labels).mean())
        metrics["val_loss"] = nll(val_probs, data.val_labels)
    config["metrics"] = {"evaluated_with": "load_serving_model, fp32, uint8 images", **metrics}
    checkpoint.write_config(run_dir, config)

    title = f"{run_dir.name}: {spec.dataset} test, accuracy {metrics['test_accuracy']:.2%}"
    per_class = report.write_test_report(run_dir, data.test.labels, test_probs, data.class_names, title)
    report.write_history(run_dir, state["history"])
    report.save_curves_png(run_dir, state["history"], run_dir.name)
    (run_dir / checkpoint.TRAINING_STATE_FILE).unlink(missing_ok=True)  # the run is complete
    return {"run_dir": run_dir, "config": config, "per_class": per_class, "test_probabilities": test_probs,
            "network": network}


def _base_config(spec: RunSpec, data: PreparedData, shape: tuple[int, int, int], norm: dict, params: int) -> dict:
    h = spec.hyper
    hyperparameters = {k: v for k, v in h.items() if k not in ("dataset", "arch_args")}
    return {
        "format_version": checkpoint.FORMAT_VERSION,
        "architecture": spec.architecture,
        "arch_args": h["arch_args"],
        "dataset": spec.dataset,
        "class_names": list(data.class_names),
        "input": {"height": shape[0], "width": shape[1], "channels": shape[2], "dtype": "uint8", "layout": "NHWC"},
        "normalization": {"mean": norm["mean"], "std": norm["std"]},
        "serving": {"tta": h["tta"]},
        "parameters": params,
        "seed": spec.seed,
        "split_seed": spec.split_seed,
        "val_fraction": spec.val_fraction,
        "train_samples": int(len(data.train_labels)),
        "val_samples": int(len(data.val_labels)),
        "hyperparameters": hyperparameters,
        "metrics": {},
        "versions": {"torch": torch.__version__, "torchvision": _package_version("torchvision"),
                     "python": platform.python_version(), "numpy": np.__version__},  # fmt: skip
        "command": spec.command,
    }


def _package_version(name: str) -> str | None:
    """Installed version without importing the package (torchvision takes seconds to import)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _finished_config(run_dir: Path) -> dict | None:
    try:
        config = checkpoint.read_config(run_dir)
    except checkpoint.RunDirError:
        return None
    return config if config.get("status") == "complete" else None


def _summary_from_config(run_dir: Path, config: dict, test: Dataset, env: Environment) -> dict:
    """A finished run skipped by --resume still contributes to the ensemble figure."""
    if not env.is_main:
        return {}
    serving, _ = checkpoint.load_serving_model(run_dir)
    probs = predict(serving.to(env.device), test.images, env.device, config["hyperparameters"]["eval_batch_size"])
    return {"run_dir": run_dir, "config": config, "per_class": None, "test_probabilities": probs}


# --------------------------------------------------------------------------- progress display


class _EpochProgress:
    """A rich progress bar per epoch (on a terminal) and one plain line per epoch (always)."""

    def __init__(self, console, enabled: bool):
        self.console, self.enabled = console, enabled

    @contextlib.contextmanager
    def epoch(self, epoch: int, epochs: int, steps: int, start_step: int):
        if not (self.enabled and self.console.is_terminal):
            yield _NoBar()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"),
                   TimeElapsedColumn(), TimeRemainingColumn()]  # fmt: skip
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task("train", total=steps, completed=start_step, loss=float("nan"), acc=0.0)
            yield _Bar(progress, task)

    def epoch_done(self, row: dict) -> None:
        if not self.enabled:
            return
        val = ""
        if row["val_accuracy"] is not None:
            val = f"  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.2%}"
        self.console.print(
            f"epoch {row['epoch']:3d}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_accuracy']:.2%}{val}  {row['epoch_seconds']:.1f}s",
            highlight=False,
        )


class _Bar:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, totals: torch.Tensor) -> None:
        loss, correct, count = totals.tolist()
        self.progress.update(self.task, advance=1, loss=loss / count, acc=correct / count)


class _NoBar:
    def advance(self, totals: torch.Tensor) -> None:
        pass
