"""Training data: loading, normalization constants, the train/validation split, augmentation, batching.

The whole data set lives in memory as one uint8 tensor (CIFAR-10 is 150 MB), and each
epoch's augmentation runs on it in a few whole-tensor operations, in place of a
per-image torchvision pipeline behind a DataLoader. On this project's 2-core machine
that is far faster (measure with `python -m trainer.data`), and it makes every epoch's
order and augmentation a pure function of (seed, epoch), which is what lets --resume
continue mid-epoch exactly and DDP ranks agree on the shuffle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ensemble_serving.datasets import Dataset, DatasetError, load_dataset
from trainer.errors import TrainerError

# Per-channel statistics of the training sets on the 0..1 pixel scale (the usual published
# values; the serving module bakes them into the graph, so clients never see them).
NORMALIZATION = {
    "mnist": {"mean": [0.1307], "std": [0.3081]},
    "cifar10": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]},
}


@dataclass(frozen=True)
class Augmentation:
    """Batch augmentations applied to uint8 NCHW images, each optional."""

    translate: int = 0  # random shift of up to this many pixels (pad then crop)
    pad_mode: str = "reflect"  # "reflect" (CIFAR) or "constant" (zeros: MNIST's black border)
    flip: str = "none"  # "none" | "random" | "alternating" (each image flips on alternate epochs)
    cutout: int = 0  # side of a square zeroed at a random place; 0 = off

    @classmethod
    def from_dict(cls, spec: dict) -> "Augmentation":
        return cls(**spec)


def split_train_validation(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of the training set: (train indices, validation indices).

    The split depends only on `seed` and the labels, so every member of an ensemble
    trained with the same --split-seed sees the same validation images.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(members) * val_fraction))
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(val_parts))


def to_nchw_tensor(images_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] numpy -> contiguous uint8 [N, C, H, W] tensor."""
    return torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))


class Normalizer:
    """uint8 NCHW -> float (x / 255 - mean) / std, on the training device."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.scale = 1 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)

    def __call__(self, images: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
        x = (images.float() - self.mean) * self.scale
        return x.contiguous(memory_format=memory_format)


# --------------------------------------------------------------------------- the run's data


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


def prepare_data(train: Dataset, test: Dataset, val_fraction: float, split_seed: int, device: torch.device) -> PreparedData:
    """The training images on the device, the validation split held out (uint8 NHWC, for the serving model)."""
    train_idx, val_idx = split_train_validation(train.labels, val_fraction, split_seed)
    if val_fraction > 0 and len(val_idx) == 0:
        raise TrainerError(f"--val-fraction {val_fraction} leaves no validation images out of {len(train)}")
    return PreparedData(
        class_names=train.class_names,
        train_images=to_nchw_tensor(train.images[train_idx]).to(device),
        train_labels=torch.from_numpy(train.labels[train_idx]).to(device),
        val_images_nhwc=train.images[val_idx],
        val_labels=train.labels[val_idx],
        test=test,
    )


# --------------------------------------------------------------------------- augmentation


def random_translate(images: torch.Tensor, max_shift: int, pad_mode: str, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by an independent random (dy, dx) in [-max_shift, max_shift].

    Pads the batch once, then copies out one slice per distinct shift: (2s+1)^2 tensor
    slices instead of N per-image crops.
    """
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = pad(images, max_shift, pad_mode)
    shifts = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    out = torch.empty_like(images)
    for dy in range(2 * max_shift + 1):
        for dx in range(2 * max_shift + 1):
            chosen = torch.nonzero((shifts[0] == dy) & (shifts[1] == dx)).flatten().to(images.device)
            if len(chosen):
                out[chosen] = padded[chosen, :, dy : dy + h, dx : dx + w]
    return out


def pad(images: torch.Tensor, amount: int, mode: str) -> torch.Tensor:
    """Pad H and W by `amount`: zeros ("constant") or mirrored pixels ("reflect"), staying uint8."""
    if mode == "constant":
        return torch.nn.functional.pad(images, (amount,) * 4)
    if mode != "reflect":
        raise ValueError(f"unknown pad mode {mode!r}: expected constant or reflect")
    # F.pad's reflect mode does not take uint8; gathering mirrored rows/columns does.
    h, w = images.shape[-2:]
    rows = _reflect_indices(h, amount, images.device)
    cols = _reflect_indices(w, amount, images.device)
    return images.index_select(2, rows).index_select(3, cols)


def _reflect_indices(size: int, amount: int, device) -> torch.Tensor:
    """[amount, ..., 1, 0, 1, ..., size-1, size-2, ..., size-1-amount] (edge not repeated)."""
    index = torch.arange(-amount, size + amount, device=device).abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def flip_mask(n: int, mode: str, epoch: int, seed: int) -> torch.Tensor | None:
    """Which images to mirror this epoch.

    "alternating": a random half flips on even epochs and the other half on odd ones, so
    over any two epochs every image is seen both ways (better than chance in short runs).
    """
    if mode == "none":
        return None
    if mode == "random":
        return torch.rand(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)) < 0.5
    if mode == "alternating":
        base = torch.rand(n, generator=torch.Generator().manual_seed(seed * 1_000_003)) < 0.5
        return base ^ bool(epoch % 2)
    raise ValueError(f"unknown flip mode {mode!r}: expected none, random or alternating")


def random_cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a size x size square centred at a random pixel of each image (clipped at edges)."""
    if size == 0:
        return images
    n, _, h, w = images.shape
    top = torch.randint(0, h, (n, 1, 1), generator=generator).to(images.device) - size // 2
    left = torch.randint(0, w, (n, 1, 1), generator=generator).to(images.device) - size // 2
    ys = torch.arange(h, device=images.device).view(1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, w)
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return images.masked_fill(inside.unsqueeze(1), 0)


def augment_epoch(images: torch.Tensor, aug: Augmentation, epoch: int, seed: int) -> torch.Tensor:
    """The whole training set as seen in `epoch`: a pure function of (images, aug, epoch, seed)."""
    generator = torch.Generator().manual_seed(seed * 7_919 + epoch * 104_729 + 1)
    out = random_translate(images, aug.translate, aug.pad_mode, generator)
    mask = flip_mask(len(images), aug.flip, epoch, seed)
    if mask is not None:
        mask = mask.to(images.device)
        out = torch.where(mask.view(-1, 1, 1, 1), out.flip(3), out)
    return random_cutout(out, aug.cutout, generator)


# --------------------------------------------------------------------------- batching


class InMemoryLoader:
    """Yields (uint8 images, labels, *extras) batches of one epoch, sharded across DDP ranks.

    Every rank computes the same permutation and augmentation from (seed, epoch) and
    keeps its own stride of each global batch, so ranks need no data exchange. The last
    partial batch is dropped when training (BatchNorm dislikes tiny batches). `extras`:
    further per-sample tensors (a distillation teacher's targets), indexed like the labels;
    without them a batch is (images, labels).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, aug: Augmentation | None,
                 seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 extras: tuple[torch.Tensor, ...] = ()):  # fmt: skip
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world_size} processes")
        if any(len(extra) != len(labels) for extra in extras):
            raise ValueError(f"every extra per-sample tensor needs {len(labels)} rows, one per image")
        self.images, self.labels, self.extras = images, labels, tuple(extras)
        self.batch_size, self.aug, self.seed = batch_size, aug, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int, start_step: int = 0):
        images = augment_epoch(self.images, self.aug, epoch, self.seed) if self.aug else self.images
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.seed * 31 + epoch))
        order = order.to(self.images.device)
        for step in range(start_step, len(self)):
            batch = order[step * self.batch_size : (step + 1) * self.batch_size]
            batch = batch[self.rank :: self.world_size]
            yield images[batch], self.labels[batch], *(extra[batch] for extra in self.extras)


# --------------------------------------------------------------------------- measurement


def _benchmark_loaders(n: int = 20000, batch_size: int = 512) -> None:
    """Compare one epoch of CIFAR-style augmentation: in-memory tensors vs torchvision + DataLoader."""
    import time

    import torchvision.transforms.v2 as T
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, n))
    normalize = Normalizer(NORMALIZATION["cifar10"]["mean"], NORMALIZATION["cifar10"]["std"], torch.device("cpu"))
    aug = Augmentation(translate=2, flip="alternating", cutout=0)

    start = time.perf_counter()
    for x, _ in InMemoryLoader(images, labels, batch_size, aug, seed=0).epoch(0):
        normalize(x)
    in_memory = time.perf_counter() - start

    transform = T.Compose([T.RandomCrop(32, padding=2, padding_mode="reflect"), T.RandomHorizontalFlip(),
                           T.ToDtype(torch.float32, scale=True),
                           T.Normalize(NORMALIZATION["cifar10"]["mean"], NORMALIZATION["cifar10"]["std"])])  # fmt: skip

    class Transformed(TensorDataset):
        def __getitem__(self, index):
            image, label = super().__getitem__(index)
            return transform(image), label

    results = {}
    for workers in (0, 2):
        loader = DataLoader(Transformed(images, labels), batch_size=batch_size, shuffle=True, num_workers=workers)
        start = time.perf_counter()
        for _ in loader:
            pass
        results[workers] = time.perf_counter() - start
    print(f"{n} CIFAR-size images, batch {batch_size}, translate 2 + flip + normalize, one epoch:")
    print(f"  in-memory tensor loader:               {in_memory:7.2f} s")
    for workers, seconds in results.items():
        print(f"  torchvision v2 + DataLoader({workers} workers): {seconds:7.2f} s  ({seconds / in_memory:.0f}x slower)")


if __name__ == "__main__":
    _benchmark_loaders()
